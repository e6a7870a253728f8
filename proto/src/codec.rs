//! The protobuf codec of every quiver RPC: prost's, except that a message
//! that does not decode is the caller's fault (`INVALID_ARGUMENT`), not
//! the server's (`INTERNAL`, tonic's default): retry policies and
//! server-error alerts then treat client garbage as what it is.

use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, ProstCodec};
use tonic::{Code, Status};

/// [`ProstCodec`] with decode failures as `INVALID_ARGUMENT`.
#[derive(Debug, Clone)]
pub struct QuiverCodec<T, U>(ProstCodec<T, U>);

impl<T, U> Default for QuiverCodec<T, U> {
    fn default() -> Self {
        QuiverCodec(ProstCodec::default())
    }
}

impl<T, U> Codec for QuiverCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <ProstCodec<T, U> as Codec>::Encoder;
    type Decoder = QuiverDecoder<<ProstCodec<T, U> as Codec>::Decoder>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        QuiverDecoder(self.0.decoder())
    }
}

/// The decoder of [`QuiverCodec`].
#[derive(Debug)]
pub struct QuiverDecoder<D>(D);

impl<D: Decoder<Error = Status>> Decoder for QuiverDecoder<D> {
    type Item = D::Item;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Status> {
        self.0.decode(src).map_err(|s| {
            if s.code() == Code::Internal {
                Status::invalid_argument(format!("malformed protobuf message: {}", s.message()))
            } else {
                s
            }
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
