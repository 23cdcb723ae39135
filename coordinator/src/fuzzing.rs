//! Property checks on the coordinator's outside inputs, shared by the fuzz
//! targets (`fuzz/`) and the corpus replay test (see
//! `drover_common::fuzzing`). Bad input must never panic.

use drover_common::proto::{AgentMessage, CoordinatorMessage, Hello, Pipeline, agent_message};
use prost::Message;

use crate::api::agent_control::validate_hello;
use crate::deploy::pipeline::{validate, with_defaults};

/// Pipeline files (`droverctl pipeline apply`): TOML into the proto, the
/// defaults, validation; defaults applied twice change nothing.
pub fn pipeline(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(pipeline) = toml::from_str::<Pipeline>(text) else {
        return;
    };
    let pipeline = with_defaults(pipeline);
    if validate(&pipeline).is_ok() {
        let again = with_defaults(pipeline.clone());
        assert_eq!(again, pipeline, "defaults are idempotent");
        assert!(validate(&again).is_ok());
    }
}

/// The agent stream, decoded as each side does (the first byte picks the
/// side): the coordinator's AgentMessage and Hello validation, the agent's
/// CoordinatorMessage. An accepted Hello re-encodes to itself.
pub fn agent_messages(data: &[u8]) {
    let Some((side, bytes)) = data.split_first() else {
        return;
    };
    if side % 2 == 0 {
        if let Ok(msg) = AgentMessage::decode(bytes)
            && let Some(agent_message::Msg::Hello(hello)) = msg.msg
            && validate_hello(&hello).is_ok()
        {
            let again =
                Hello::decode(hello.encode_to_vec().as_slice()).expect("a Hello re-decodes");
            assert_eq!(again, hello);
        }
    } else if let Ok(msg) = CoordinatorMessage::decode(bytes) {
        let _ = msg.encoded_len();
    }
}
