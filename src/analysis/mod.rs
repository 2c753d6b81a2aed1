//! Reading an experiment's tables after the fact: how alike the templates are ([`collapse`]),
//! per-iteration summaries with polars ([`summary`]), and the plots and index ([`report`]).

pub mod collapse;
pub mod report;
pub mod summary;
