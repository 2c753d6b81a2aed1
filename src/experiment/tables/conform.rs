//! Reading columns written by any Parquet writer: polars and pandas 3 write `large_string`
//! (polars now string views), DuckDB names list children `element` and makes every field
//! nullable, and integers come in every width. A column whose type holds the same values as
//! the expected one is cast to it; anything else is refused, naming the column, the type
//! found and the type expected.

use anyhow::{bail, Context};
use arrow::array::{Array, ArrayRef};
use arrow::compute::{cast_with_options, CastOptions};
use arrow::datatypes::DataType;

/// Whether every value of type `from` has one exact counterpart in `to`: strings of any
/// encoding, lists of any offset size or child name whose items conform, structs with the
/// same field names whose fields conform, and integers widening (or narrowing, checked per
/// value by the cast).
pub fn conforms(from: &DataType, to: &DataType) -> bool {
    use DataType::*;
    let string = |t: &DataType| matches!(t, Utf8 | LargeUtf8 | Utf8View);
    let integer = |t: &DataType| matches!(t, Int8 | Int16 | Int32 | Int64 | UInt8 | UInt16 | UInt32 | UInt64);
    let list_item = |t: &DataType| match t {
        List(f) | LargeList(f) | ListView(f) | LargeListView(f) => Some(f.data_type().clone()),
        _ => None,
    };
    if from == to {
        return true;
    }
    match (from, to) {
        (f, t) if string(f) && string(t) => true,
        (f, t) if integer(f) && integer(t) => true,
        (Float32, Float64) => true,
        (Struct(ff), Struct(tf)) => {
            ff.len() == tf.len()
                && tf.iter().all(|t| ff.iter().find(|f| f.name() == t.name()).is_some_and(|f| conforms(f.data_type(), t.data_type())))
        }
        (f, t) => match (list_item(f), list_item(t)) {
            (Some(fi), Some(ti)) => conforms(&fi, &ti),
            _ => false,
        },
    }
}

/// `array` as type `to`: unchanged when it already is, cast when it [`conforms`], and an
/// error naming `what` (file and column) otherwise, or when a value does not fit (an
/// integer out of range becomes an error, never a silent null).
pub fn conform(array: &ArrayRef, to: &DataType, what: &str) -> anyhow::Result<ArrayRef> {
    if array.data_type() == to {
        return Ok(array.clone());
    }
    if !conforms(array.data_type(), to) {
        bail!("{what} has type {}, expected {} (or a type holding the same values)", array.data_type(), to);
    }
    let options = CastOptions { safe: false, ..Default::default() };
    let cast = cast_with_options(array, to, &options)
        .with_context(|| format!("{what}: a value of type {} does not fit {to}", array.data_type()))?;
    anyhow::ensure!(cast.null_count() == array.null_count(), "{what}: values of type {} do not fit {to}", array.data_type());
    Ok(cast)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use arrow::array::{Int32Array, LargeListArray, LargeStringArray, StringViewArray};
    use arrow::datatypes::Field;

    #[test]
    fn same_values_cast_and_mismatches_are_named() {
        let large: ArrayRef = Arc::new(LargeStringArray::from(vec!["a", "b"]));
        let got = conform(&large, &DataType::Utf8, "f.parquet: column title").unwrap();
        assert_eq!(got.data_type(), &DataType::Utf8);
        let view: ArrayRef = Arc::new(StringViewArray::from(vec!["x"]));
        assert_eq!(conform(&view, &DataType::Utf8, "v").unwrap().data_type(), &DataType::Utf8);
        let ints: ArrayRef = Arc::new(Int32Array::from(vec![1, 2]));
        assert_eq!(conform(&ints, &DataType::Int64, "i").unwrap().data_type(), &DataType::Int64);
        // a list with DuckDB's child name, nullable, of large strings
        let child = Arc::new(Field::new("element", DataType::LargeUtf8, true));
        let list: ArrayRef = Arc::new(LargeListArray::new(
            child,
            arrow::buffer::OffsetBuffer::new(vec![0i64, 1, 2].into()),
            Arc::new(LargeStringArray::from(vec!["p", "q"])),
            None,
        ));
        let want = DataType::List(Arc::new(Field::new("item", DataType::Utf8, true)));
        assert_eq!(conform(&list, &want, "l").unwrap().data_type(), &want);
        // a real mismatch names the place and both types
        let e = conform(&ints, &DataType::Utf8, "t.parquet: column context").unwrap_err().to_string();
        assert!(e.contains("t.parquet: column context") && e.contains("Int32") && e.contains("Utf8"), "{e}");
        // an integer that does not fit is an error, not a null
        let big: ArrayRef = Arc::new(arrow::array::Int64Array::from(vec![1i64 << 40]));
        assert!(conform(&big, &DataType::Int32, "b").is_err());
    }

    /// Structs conform field by field, by name, and only with the same fields.
    #[test]
    fn structs_conform_by_field_name_and_type() {
        let fields =
            |f: &[(&str, DataType)]| DataType::Struct(f.iter().map(|(name, t)| Arc::new(Field::new(*name, t.clone(), true))).collect());
        let want = fields(&[("rank", DataType::Int64), ("name", DataType::Utf8)]);
        // reordered, narrower integer, another string encoding
        assert!(conforms(&fields(&[("name", DataType::LargeUtf8), ("rank", DataType::Int32)]), &want));
        // same field count, a field of another kind
        assert!(!conforms(&fields(&[("rank", DataType::Int64), ("name", DataType::Float64)]), &want));
        // a field too many, a field missing, a field renamed
        assert!(!conforms(&fields(&[("rank", DataType::Int64), ("name", DataType::Utf8), ("x", DataType::Utf8)]), &want));
        assert!(!conforms(&fields(&[("rank", DataType::Int64)]), &want));
        assert!(!conforms(&fields(&[("rank", DataType::Int64), ("title", DataType::Utf8)]), &want));
    }
}
