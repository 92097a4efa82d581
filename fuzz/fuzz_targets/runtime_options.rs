//! The shim's decoder of containerd's runtime options (`crates/shim/src/options.rs`).
//!
//! The first byte picks what the rest is:
//! - 0: what `start` reads from stdin (one encoded `Any`), decoded as `start_for_containerd_1_6` does;
//! - 1: an encoded `CreateTaskRequest` whose `options` carry the config path;
//! - 2: an `Any` with `runtimeoptions.v1.Options` as type and the rest as its value, the hand-written decoder alone;
//! - 3: a well-formed `runtimeoptions.v1.Options` among arbitrary other fields (from `arbitrary`), encoded with
//!   the protobuf crate: the decoder must return exactly the config path protobuf's rules give;
//! - else: OCI annotations for the shim grouping (from `arbitrary`).

#![no_main]

use std::collections::HashMap;
use std::path::PathBuf;

use arbitrary::{Arbitrary, Unstructured};
use containerd_shim_protos::api::CreateTaskRequest;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::{CodedOutputStream, Message};
use libfuzzer_sys::fuzz_target;

const OPTIONS_TYPE: &str = "runtimeoptions.v1.Options";
/// Field 2 of `runtimeoptions.v1.Options`.
const CONFIG_PATH: u32 = 2;
const FIELD_NUMBER_MAX: u32 = (1 << 29) - 1;

#[derive(Arbitrary, Debug)]
enum Field {
    Varint(u32, u64),
    Fixed64(u32, u64),
    Fixed32(u32, u32),
    Bytes(u32, Vec<u8>),
    ConfigPath(String),
}

#[derive(Arbitrary, Debug)]
struct Encoded {
    type_url_prefix: bool,
    fields: Vec<Field>,
}

#[derive(Arbitrary, Debug)]
struct Grouping {
    id: String,
    annotations: Option<HashMap<String, String>>,
}

fn number(n: u32) -> u32 {
    1 + n % FIELD_NUMBER_MAX
}

/// Encodes `fields` and returns what a protobuf decoder sees as `config_path`: the last occurrence of field 2,
/// `None` if any occurrence is not UTF-8 (a string field) or the last is empty (proto3's default).
fn encode(fields: &[Field]) -> (Vec<u8>, Option<PathBuf>) {
    let mut buf = Vec::new();
    let mut last: Option<Vec<u8>> = None;
    let mut utf8 = true;
    {
        let mut out = CodedOutputStream::vec(&mut buf);
        for f in fields {
            let written = match f {
                Field::Varint(n, v) => out.write_uint64(number(*n), *v),
                Field::Fixed64(n, v) => out.write_fixed64(number(*n), *v),
                Field::Fixed32(n, v) => out.write_fixed32(number(*n), *v),
                Field::Bytes(n, v) => {
                    if number(*n) == CONFIG_PATH {
                        utf8 &= std::str::from_utf8(v).is_ok();
                        last = Some(v.clone());
                    }
                    out.write_bytes(number(*n), v)
                }
                Field::ConfigPath(s) => {
                    last = Some(s.as_bytes().to_vec());
                    out.write_string(CONFIG_PATH, s)
                }
            };
            written.expect("encode into a Vec");
        }
        out.flush().expect("flush into a Vec");
    }
    let expected =
        last.filter(|v| utf8 && !v.is_empty()).map(|v| PathBuf::from(String::from_utf8(v).expect("checked above")));
    (buf, expected)
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    match mode {
        0 => {
            if let Some(any) = Any::parse_from_bytes(rest).ok().filter(|a| !a.type_url.is_empty()) {
                let _ = shim_options::config_path(&any);
            }
        }
        1 => {
            if let Ok(req) = CreateTaskRequest::parse_from_bytes(rest) {
                let _ = req.options.as_ref().and_then(shim_options::config_path);
            }
        }
        2 => {
            let mut any = Any::new();
            any.type_url = OPTIONS_TYPE.to_owned();
            any.value = rest.to_vec();
            let _ = shim_options::config_path(&any);
        }
        3 => {
            let Ok(input) = Encoded::arbitrary_take_rest(Unstructured::new(rest)) else { return };
            let (value, expected) = encode(&input.fields);
            let mut any = Any::new();
            any.type_url = if input.type_url_prefix {
                format!("type.googleapis.com/{OPTIONS_TYPE}")
            } else {
                OPTIONS_TYPE.to_owned()
            };
            any.value = value;
            assert_eq!(shim_options::config_path(&any), expected, "{input:?}");
            // The same Any as containerd sends it on stdin.
            let wire = any.write_to_bytes().expect("encode Any");
            let parsed = Any::parse_from_bytes(&wire).expect("decode Any");
            assert_eq!(shim_options::config_path(&parsed), expected);
        }
        _ => {
            let Ok(g) = Grouping::arbitrary_take_rest(Unstructured::new(rest)) else { return };
            let _ = shim_options::grouping(&g.id, g.annotations.as_ref());
            let _ = shim_options::starts_sandbox(g.annotations.as_ref());
        }
    }
});
