//! The protobuf codec of every Drover service and client.
//!
//! It is tonic-prost's codec with small initial buffers. tonic's default
//! allocates 8 KiB per direction per stream up front; a coordinator holds one
//! stream per agent whose messages are a few hundred bytes, so at 10,000
//! agents the defaults alone would cost 160 MiB. Buffers still grow to fit
//! any message up to the configured limit.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// Initial encode/decode buffer per stream.
const BUFFER_SIZE: usize = 1024;
/// Encoded bytes gathered before yielding to the transport (tonic's default).
const YIELD_THRESHOLD: usize = 32 * 1024;

#[derive(Debug, Clone, Copy)]
pub struct DroverCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for DroverCodec<T, U> {
    fn default() -> Self {
        DroverCodec(PhantomData)
    }
}

impl<T, U> Codec for DroverCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD))
    }
}
