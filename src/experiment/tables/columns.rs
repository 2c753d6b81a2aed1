//! How Rust values are stored in Arrow columns: [`Column`] for one column (strings, numbers,
//! lists, the state enums, questions), [`Columns`] for a field stored as several columns
//! (the template hyperparameters, one column each).

use std::sync::Arc;

use anyhow::Context;
use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Float32Builder, Float64Array, Int64Array, ListBuilder, StringArray, StringBuilder, StructArray,
};
use arrow::datatypes::{DataType, Field, Fields, Float32Type};

use super::Question;
use crate::experiment::states::{AdapterStatus, ArmKind, Category, GraderKind, SftKind, Split};
use crate::experiment::template::Hyperparameters;

/// A Rust type stored as one Arrow column.
pub trait Column: Sized {
    /// The Arrow type of the column.
    fn data_type() -> DataType;
    fn nullable() -> bool {
        false
    }
    fn build(values: &[&Self]) -> ArrayRef;
    fn read(array: &dyn Array, row: usize) -> anyhow::Result<Self>;
}

pub(super) fn downcast_err(expected: &str, got: &DataType) -> anyhow::Error {
    anyhow::anyhow!("expected {expected}, found {got}")
}

impl Column for String {
    fn data_type() -> DataType {
        DataType::Utf8
    }
    fn build(values: &[&Self]) -> ArrayRef {
        Arc::new(StringArray::from_iter_values(values.iter().map(|s| s.as_str())))
    }
    fn read(array: &dyn Array, row: usize) -> anyhow::Result<Self> {
        let a = array.as_string_opt::<i32>().ok_or_else(|| downcast_err("utf8", array.data_type()))?;
        Ok(a.value(row).to_string())
    }
}

impl Column for Option<String> {
    fn data_type() -> DataType {
        DataType::Utf8
    }
    fn nullable() -> bool {
        true
    }
    fn build(values: &[&Self]) -> ArrayRef {
        Arc::new(StringArray::from_iter(values.iter().map(|s| s.as_deref())))
    }
    fn read(array: &dyn Array, row: usize) -> anyhow::Result<Self> {
        let a = array.as_string_opt::<i32>().ok_or_else(|| downcast_err("utf8", array.data_type()))?;
        Ok(if a.is_null(row) { None } else { Some(a.value(row).to_string()) })
    }
}

/// The numeric columns, plain and nullable.
macro_rules! primitive_columns {
    ($($t:ty => $array:ty, $dt:expr, $name:literal);* $(;)?) => {$(
        impl Column for $t {
            fn data_type() -> DataType {
                $dt
            }
            fn build(values: &[&Self]) -> ArrayRef {
                Arc::new(<$array>::from_iter_values(values.iter().map(|v| **v)))
            }
            fn read(array: &dyn Array, row: usize) -> anyhow::Result<Self> {
                let a = array.as_any().downcast_ref::<$array>().ok_or_else(|| downcast_err($name, array.data_type()))?;
                Ok(a.value(row))
            }
        }

        impl Column for Option<$t> {
            fn data_type() -> DataType {
                $dt
            }
            fn nullable() -> bool {
                true
            }
            fn build(values: &[&Self]) -> ArrayRef {
                Arc::new(<$array>::from_iter(values.iter().map(|v| **v)))
            }
            fn read(array: &dyn Array, row: usize) -> anyhow::Result<Self> {
                let a = array.as_any().downcast_ref::<$array>().ok_or_else(|| downcast_err($name, array.data_type()))?;
                Ok(if a.is_null(row) { None } else { Some(a.value(row)) })
            }
        }
    )*};
}
primitive_columns!(i64 => Int64Array, DataType::Int64, "int64"; f64 => Float64Array, DataType::Float64, "float64");

impl Column for bool {
    fn data_type() -> DataType {
        DataType::Boolean
    }
    fn build(values: &[&Self]) -> ArrayRef {
        Arc::new(BooleanArray::from(values.iter().map(|v| **v).collect::<Vec<bool>>()))
    }
    fn read(array: &dyn Array, row: usize) -> anyhow::Result<Self> {
        let a = array.as_boolean_opt().ok_or_else(|| downcast_err("boolean", array.data_type()))?;
        Ok(a.value(row))
    }
}

impl Column for Vec<String> {
    fn data_type() -> DataType {
        DataType::List(Arc::new(Field::new("item", DataType::Utf8, true)))
    }
    fn build(values: &[&Self]) -> ArrayRef {
        let mut b = ListBuilder::new(StringBuilder::new());
        for v in values {
            for s in v.iter() {
                b.values().append_value(s);
            }
            b.append(true);
        }
        Arc::new(b.finish())
    }
    fn read(array: &dyn Array, row: usize) -> anyhow::Result<Self> {
        let l = array.as_list_opt::<i32>().ok_or_else(|| downcast_err("list<utf8>", array.data_type()))?;
        let v = l.value(row);
        let s = v.as_string_opt::<i32>().ok_or_else(|| downcast_err("list<utf8>", array.data_type()))?;
        Ok((0..s.len()).map(|i| s.value(i).to_string()).collect())
    }
}

impl Column for Vec<f32> {
    fn data_type() -> DataType {
        DataType::List(Arc::new(Field::new("item", DataType::Float32, true)))
    }
    fn build(values: &[&Self]) -> ArrayRef {
        let mut b = ListBuilder::new(Float32Builder::new());
        for v in values {
            b.values().append_slice(v);
            b.append(true);
        }
        Arc::new(b.finish())
    }
    fn read(array: &dyn Array, row: usize) -> anyhow::Result<Self> {
        let l = array.as_list_opt::<i32>().ok_or_else(|| downcast_err("list<float32>", array.data_type()))?;
        let v = l.value(row);
        let f = v.as_primitive_opt::<Float32Type>().ok_or_else(|| downcast_err("list<float32>", array.data_type()))?;
        Ok(f.values().to_vec())
    }
}

fn question_fields() -> Fields {
    Fields::from(vec![Field::new("question", DataType::Utf8, false), Field::new("answers", <Vec<String>>::data_type(), false)])
}

/// Questions as `list<struct<question: utf8, answers: list<utf8>>>`.
impl Column for Vec<Question> {
    fn data_type() -> DataType {
        DataType::List(Arc::new(Field::new("item", DataType::Struct(question_fields()), true)))
    }
    fn build(values: &[&Self]) -> ArrayRef {
        let mut offsets = vec![0i32];
        let mut qs: Vec<&String> = Vec::new();
        let mut ans: Vec<&Vec<String>> = Vec::new();
        for v in values {
            for q in v.iter() {
                qs.push(&q.question);
                ans.push(&q.answers);
            }
            offsets.push(qs.len() as i32);
        }
        let structs = StructArray::new(question_fields(), vec![String::build(&qs), <Vec<String>>::build(&ans)], None);
        let field = Arc::new(Field::new("item", DataType::Struct(question_fields()), true));
        Arc::new(arrow::array::ListArray::new(field, arrow::buffer::OffsetBuffer::new(offsets.into()), Arc::new(structs), None))
    }
    fn read(array: &dyn Array, row: usize) -> anyhow::Result<Self> {
        let l = array.as_list_opt::<i32>().ok_or_else(|| downcast_err("list<struct>", array.data_type()))?;
        let v = l.value(row);
        let s = v.as_struct_opt().ok_or_else(|| downcast_err("list<struct>", array.data_type()))?;
        let q = s.column_by_name("question").context("questions: no field question")?;
        let a = s.column_by_name("answers").context("questions: no field answers")?;
        (0..s.len())
            .map(|i| Ok(Question { question: String::read(q.as_ref(), i)?, answers: <Vec<String>>::read(a.as_ref(), i)? }))
            .collect()
    }
}

/// Declares the state enums as Utf8 columns holding their string form.
macro_rules! enum_columns {
    ($($t:ty),*) => {$(
        impl Column for $t {
            fn data_type() -> DataType {
                DataType::Utf8
            }
            fn build(values: &[&Self]) -> ArrayRef {
                Arc::new(StringArray::from_iter_values(values.iter().map(|s| s.as_str())))
            }
            fn read(array: &dyn Array, row: usize) -> anyhow::Result<Self> {
                <$t>::parse(&String::read(array, row)?)
            }
        }
    )*};
}
enum_columns!(Category, AdapterStatus, Split, GraderKind, SftKind, ArmKind);

/// A row field stored as one or more columns. Every [`Column`] is one column named after
/// the field; a struct such as [`Hyperparameters`] spreads over one column per member.
pub trait Columns: Sized {
    /// The Arrow fields of a row field named `name`.
    fn fields(name: &str) -> Vec<Field>;
    /// One array per field, in [`Columns::fields`] order.
    fn build_columns(values: &[&Self]) -> Vec<ArrayRef>;
    /// The value at `row` of the arrays (in [`Columns::fields`] order, types checked).
    fn read_columns(arrays: &[ArrayRef], row: usize) -> anyhow::Result<Self>;
}

impl<T: Column> Columns for T {
    fn fields(name: &str) -> Vec<Field> {
        vec![Field::new(name, T::data_type(), T::nullable())]
    }
    fn build_columns(values: &[&Self]) -> Vec<ArrayRef> {
        vec![<T as Column>::build(values)]
    }
    fn read_columns(arrays: &[ArrayRef], row: usize) -> anyhow::Result<Self> {
        <T as Column>::read(arrays[0].as_ref(), row)
    }
}

/// The hyperparameters as one column each, named as the template JSON names them
/// (`lora_rank`, ...): integers int64, reals float64.
impl Columns for Hyperparameters {
    fn fields(_: &str) -> Vec<Field> {
        Hyperparameters::NAMES
            .iter()
            .zip(Hyperparameters::INTEGER)
            .map(|(n, int)| Field::new(*n, if *int { DataType::Int64 } else { DataType::Float64 }, false))
            .collect()
    }
    fn build_columns(values: &[&Self]) -> Vec<ArrayRef> {
        let rows: Vec<Vec<f64>> = values.iter().map(|h| h.values()).collect();
        Hyperparameters::INTEGER
            .iter()
            .enumerate()
            .map(|(k, int)| -> ArrayRef {
                if *int {
                    Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r[k] as i64)))
                } else {
                    Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r[k])))
                }
            })
            .collect()
    }
    fn read_columns(arrays: &[ArrayRef], row: usize) -> anyhow::Result<Self> {
        let mut vals = Vec::with_capacity(arrays.len());
        for (a, int) in arrays.iter().zip(Hyperparameters::INTEGER) {
            vals.push(if *int { <i64 as Column>::read(a.as_ref(), row)? as f64 } else { <f64 as Column>::read(a.as_ref(), row)? });
        }
        Ok(Hyperparameters::from_values(&vals))
    }
}
