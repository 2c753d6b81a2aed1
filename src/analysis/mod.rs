//! Reading an experiment's tables after the fact: how alike the templates are ([`collapse`]),
//! per-iteration summaries with polars ([`summary`]), the plots and index ([`report`]), and
//! the paper's `results.json` layout ([`paper_json`]).

pub mod collapse;
pub mod paper_json;
pub mod report;
pub mod science;
pub mod summary;
