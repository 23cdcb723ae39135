//! cargo-fuzz target: `drover_coordinator::fuzzing::agent_messages` (its doc says what is checked).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    drover_coordinator::fuzzing::agent_messages(data);
});
