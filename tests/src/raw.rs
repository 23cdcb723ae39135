//! A hand-driven agent stream, for feeding a coordinator what a real agent
//! never sends (bad first messages, oversized messages, duplicate host ids).

use std::time::Duration;

use drover_common::proto::agent_control_client::AgentControlClient;
use drover_common::proto::{AgentMessage, CoordinatorMessage, Heartbeat, Hello, agent_message};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

pub struct RawStream {
    /// Keeps the request stream open until dropped.
    pub outbound: mpsc::Sender<AgentMessage>,
    pub inbound: Streaming<CoordinatorMessage>,
}

impl RawStream {
    /// Opens `AgentControl/Connect` and sends `first`. Fails with the status
    /// the coordinator answered.
    pub async fn open(
        addr: &str,
        first: AgentMessage,
        max_message_bytes: usize,
    ) -> Result<RawStream, Status> {
        let channel = drover_common::grpc::connect(addr)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let mut client = AgentControlClient::new(channel)
            .max_encoding_message_size(max_message_bytes)
            .max_decoding_message_size(max_message_bytes);
        let (tx, rx) = mpsc::channel(16);
        tx.send(first).await.expect("fresh channel");
        let inbound = client.connect(ReceiverStream::new(rx)).await?.into_inner();
        Ok(RawStream {
            outbound: tx,
            inbound,
        })
    }

    /// The next message, or the status that ended the stream; panics after
    /// `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> Result<Option<CoordinatorMessage>, Status> {
        tokio::time::timeout(timeout, self.inbound.message())
            .await
            .expect("timed out waiting for the coordinator")
    }
}

pub fn hello(host_id: &str, labels: &[(&str, &str)]) -> AgentMessage {
    AgentMessage {
        msg: Some(agent_message::Msg::Hello(Hello {
            host_id: host_id.to_string(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            agent_version: "raw-test".into(),
            services: vec![],
            heartbeat_interval_ms: 1000,
            ..Default::default()
        })),
    }
}

pub fn heartbeat(sequence: u64) -> AgentMessage {
    AgentMessage {
        msg: Some(agent_message::Msg::Heartbeat(Heartbeat {
            sequence,
            sent_at_unix_micros: drover_common::time::now_unix_micros(),
            ..Default::default()
        })),
    }
}
