//! The SEAL experiment on top of the runtime: the config, prompts and data, the template's
//! hyperparameters, grading and statistics, the Parquet tables, where every file lives, and
//! one file per stage.

pub mod cli;
pub mod config;
pub mod data;
pub mod grading;
pub mod layout;
pub mod novelty;
pub mod prompts;
pub mod stages;
pub mod states;
pub mod stats;
pub mod tables;
pub mod template;
