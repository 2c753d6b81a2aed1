//! The library's layers, checked on its source: util <- runtime <- experiment <- analysis
//! (nothing refers to a layer after its own), and no two modules refer to each other through
//! a cycle. A reference is a `crate::` or `super::` path in code (comments aside).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// `src/runtime/model/decoder.rs` → `runtime::model::decoder`; `mod.rs` names its folder.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    if parts.last().map(String::as_str) == Some("mod") || parts.last().map(String::as_str) == Some("lib") {
        parts.pop();
    }
    parts.join("::")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The paths after each `crate::` or `super::` in `line`, as segments.
fn paths(line: &str, module: &str, is_mod_file: bool) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for (prefix, base) in [
        ("crate::", Vec::new()),
        ("super::", {
            // super of a file module is its parent; of a mod.rs, the folder's parent
            let mut m: Vec<String> = module.split("::").filter(|s| !s.is_empty()).map(String::from).collect();
            if !is_mod_file || !m.is_empty() {
                m.pop();
            }
            m
        }),
    ] {
        let mut rest = line;
        while let Some(i) = rest.find(prefix) {
            let before = &rest[..i];
            rest = &rest[i + prefix.len()..];
            if prefix == "super::" && before.ends_with("crate::") {
                continue;
            }
            let seg: Vec<String> = rest
                .split("::")
                .map(|s| s.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect::<String>())
                .take_while(|s| !s.is_empty())
                .collect();
            let mut full = base.clone();
            full.extend(seg);
            out.push(full);
        }
    }
    out
}

fn layer(module: &str) -> usize {
    match module.split("::").next().unwrap_or("") {
        "util" => 0,
        "runtime" => 1,
        "experiment" => 2,
        "analysis" => 3,
        _ => 4,
    }
}

#[test]
fn layers_point_down_and_modules_form_no_cycle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let modules: BTreeSet<String> = files.iter().map(|f| module_of(&src, f)).collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let m = module_of(&src, f);
        let is_mod = f.file_name().is_some_and(|n| n == "mod.rs" || n == "lib.rs");
        let text = std::fs::read_to_string(f).unwrap();
        for line in text.lines().filter(|l| !l.trim_start().starts_with("//")) {
            for p in paths(line, &m, is_mod) {
                // the longest module that prefixes the path
                let target = (1..=p.len()).rev().map(|k| p[..k].join("::")).find(|c| modules.contains(c));
                if let Some(t) = target {
                    if t != m && !m.starts_with(&format!("{t}::")) && !t.is_empty() {
                        edges.entry(m.clone()).or_default().insert(t);
                    }
                }
            }
        }
    }
    assert!(edges.values().map(BTreeSet::len).sum::<usize>() > 50, "the scan found too few references: {edges:?}");
    for (from, tos) in &edges {
        for to in tos {
            assert!(layer(to) <= layer(from), "{from} (layer {}) refers to {to} (layer {}), a layer above it", layer(from), layer(to));
        }
    }
    // no cycle: depth-first search with colours
    fn visit<'a>(m: &'a str, edges: &'a BTreeMap<String, BTreeSet<String>>, state: &mut BTreeMap<&'a str, u8>, stack: &mut Vec<&'a str>) {
        match state.get(m) {
            Some(2) => return,
            Some(1) => panic!("import cycle: {} -> {m}", stack.join(" -> ")),
            _ => {}
        }
        state.insert(m, 1);
        stack.push(m);
        for t in edges.get(m).into_iter().flatten() {
            visit(t, edges, state, stack);
        }
        stack.pop();
        state.insert(m, 2);
    }
    let mut state = BTreeMap::new();
    for m in edges.keys() {
        visit(m, &edges, &mut state, &mut Vec::new());
    }
}
