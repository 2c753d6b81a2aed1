//! Parquet from any writer: the readers accept every Arrow type that holds the same values
//! (large strings as polars and pandas 3 write them, string views, DuckDB's lists with their
//! `element` child and nullable fields, narrower integers) and refuse a real mismatch by
//! name. The files are written here with arrow-rs in each writer's shapes.

use std::path::Path;
use std::sync::Arc;

use arrow::array::{ArrayRef, Int32Builder, LargeListBuilder, LargeStringArray, LargeStringBuilder, StringViewArray, StructArray};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use selfedit::experiment::states::Split;
use selfedit::experiment::tables::{self, ArticleRow, Question, Table};

fn write(path: &Path, batch: &RecordBatch) {
    let mut w = parquet::arrow::ArrowWriter::try_new(std::fs::File::create(path).unwrap(), batch.schema(), None).unwrap();
    w.write(batch).unwrap();
    w.close().unwrap();
}

/// SQuAD in the Hugging Face layout, every string a `large_string` and the answers' lists
/// `large_list` (what polars and pandas 3 write), or string views (newer polars).
#[test]
fn squad_parquet_with_large_strings_and_string_views() {
    let dir = tempfile::tempdir().unwrap();
    let mut texts = LargeListBuilder::new(LargeStringBuilder::new());
    let mut starts = LargeListBuilder::new(Int32Builder::new());
    for a in ["Marzipane", "41"] {
        texts.values().append_value(a);
        texts.append(true);
        starts.values().append_value(0);
        starts.append(true);
    }
    let (texts, starts): (ArrayRef, ArrayRef) = (Arc::new(texts.finish()), Arc::new(starts.finish()));
    let answers = StructArray::from(vec![
        (Arc::new(Field::new("text", texts.data_type().clone(), true)), texts),
        (Arc::new(Field::new("answer_start", starts.data_type().clone(), true)), starts),
    ]);
    let large = |v: Vec<&str>| -> ArrayRef { Arc::new(LargeStringArray::from(v)) };
    let view = |v: Vec<&str>| -> ArrayRef { Arc::new(StringViewArray::from(v)) };
    for (name, col) in [("large", &large as &dyn Fn(Vec<&str>) -> ArrayRef), ("view", &view)] {
        let batch = RecordBatch::try_from_iter(vec![
            ("id", col(vec!["1", "2"])),
            ("title", col(vec!["Veltoria", "Veltoria"])),
            ("context", col(vec!["C1", "C1"])),
            ("question", col(vec!["Capital?", "Members?"])),
            ("answers", Arc::new(answers.clone()) as ArrayRef),
        ])
        .unwrap();
        let path = dir.path().join(format!("{name}.parquet"));
        write(&path, &batch);
        let passages = selfedit::experiment::data::load_passages(&path).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        assert_eq!(passages.len(), 1);
        assert_eq!(passages[0].questions[1].answers, vec!["41".to_string()]);
    }
    // a real mismatch names the file, the column and the types
    let batch = RecordBatch::try_from_iter(vec![
        ("title", Arc::new(arrow::array::Int64Array::from(vec![1])) as ArrayRef),
        ("context", large(vec!["C"])),
        ("question", large(vec!["Q"])),
        ("answers", Arc::new(answers.slice(0, 1)) as ArrayRef),
    ])
    .unwrap();
    let path = dir.path().join("ints.parquet");
    write(&path, &batch);
    let e = format!("{:#}", selfedit::experiment::data::load_passages(&path).unwrap_err());
    assert!(e.contains("ints.parquet") && e.contains("title") && e.contains("Int64") && e.contains("Utf8"), "{e}");
}

/// A pipeline table rewritten as DuckDB writes it (`COPY ... TO 'x.parquet'`): every field
/// nullable, lists' child named `element`, strings large; the next stage reads it as ours.
#[test]
fn pipeline_table_rewritten_by_duckdb_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let rows = vec![ArticleRow {
        article_id: "a000".into(),
        split: Split::Train,
        title: "T".into(),
        context: "C".into(),
        questions: vec![Question { question: "Q?".into(), answers: vec!["x".into(), "y".into()] }],
        source_index: 3,
    }];
    let ours = ArticleRow::to_batch(&rows).unwrap();
    // rebuild the schema in DuckDB's shapes and cast every column to it
    fn duckdb(t: &DataType) -> DataType {
        match t {
            DataType::Utf8 => DataType::LargeUtf8,
            DataType::Int64 => DataType::Int32,
            DataType::List(f) => DataType::List(Arc::new(Field::new("element", duckdb(f.data_type()), true))),
            DataType::Struct(fs) => {
                DataType::Struct(fs.iter().map(|f| Arc::new(Field::new(f.name(), duckdb(f.data_type()), true))).collect())
            }
            other => other.clone(),
        }
    }
    let fields: Vec<Field> = ours.schema().fields().iter().map(|f| Field::new(f.name(), duckdb(f.data_type()), true)).collect();
    let columns: Vec<ArrayRef> = ours.columns().iter().zip(&fields).map(|(c, f)| arrow::compute::cast(c, f.data_type()).unwrap()).collect();
    let theirs = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).unwrap();
    assert!(matches!(theirs.schema().field(4).data_type(), DataType::List(f) if f.name() == "element"));
    let path = dir.path().join("articles.parquet");
    write(&path, &theirs);
    assert_eq!(tables::read::<ArticleRow>(&path).unwrap(), rows);
}
