//! cargo-fuzz target: `drover_common::fuzzing::manifest` (its doc says what is checked).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    drover_common::fuzzing::manifest(data);
});
