//! `ListReports` answered with the reports as stored, without decoding them and encoding them
//! again.
//!
//! # Why
//! A listing of tens of thousands of reports spent most of its time in protobuf: the store
//! decoded each report (about 13k instructions for a typical one with two observations) only
//! for tonic to encode it again, byte for byte the same. The store keeps every report
//! encoded, so the server can copy those bytes into the response frames; the client decodes
//! them as ever (the wire is unchanged: a stream of `ResetReport` messages).
//!
//! tonic generates the `Query` service with one codec for all its methods, so this module puts
//! a small router in front of it: a `ListReports` call is served here, with a codec whose
//! encoder copies bytes (requests are still decoded by prost); every other call goes to the
//! generated service. The router checks the token for every call, as the ingest service's
//! interceptor does, so neither path admits anybody the other would refuse.

use std::convert::Infallible;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes};
use rstscope_proto::v1;
use tonic::body::Body;
use tonic::codec::{Codec, EncodeBuf, Encoder};
use tonic::server::NamedService;
use tonic::{Request, Response, Status};

use crate::auth::TokenCheck;
use crate::query::{EncodedStream, QueryService};

/// The path of the method served here.
const LIST_REPORTS_PATH: &str = "/rstscope.v1.Query/ListReports";

/// Writes messages that are already encoded.
#[derive(Clone, Copy, Debug, Default)]
pub struct EncodedEncoder;

impl Encoder for EncodedEncoder {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

/// Requests decoded by prost, answers written as given.
#[derive(Debug)]
pub struct EncodedCodec<U>(PhantomData<fn() -> U>);

impl<U> Default for EncodedCodec<U> {
    fn default() -> Self {
        EncodedCodec(PhantomData)
    }
}

impl<U: prost::Message + Default + Send + 'static> Codec for EncodedCodec<U> {
    type Encode = Bytes;
    type Decode = U;
    type Encoder = EncodedEncoder;
    type Decoder = tonic_prost::ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        EncodedEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::default()
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// `ListReports` over the encoded listing of [`QueryService::encoded_listing`].
struct ListReportsEncoded(QueryService);

impl tonic::server::ServerStreamingService<v1::ResetFilter> for ListReportsEncoded {
    type Response = Bytes;
    type ResponseStream = EncodedStream;
    type Future = BoxFuture<Result<Response<EncodedStream>, Status>>;

    fn call(&mut self, request: Request<v1::ResetFilter>) -> Self::Future {
        let service = self.0.clone();
        Box::pin(async move { Ok(Response::new(service.encoded_listing(request.get_ref()).await?)) })
    }
}

/// The `Query` service behind the token check, with `ListReports` served from encoded reports;
/// `S` is the generated service, which answers everything else.
#[derive(Clone)]
pub struct QueryRouter<S> {
    inner: S,
    service: QueryService,
    token: TokenCheck,
    max_encoding_bytes: usize,
}

impl<S> QueryRouter<S> {
    /// Admits calls with `token` only; routes `ListReports` to `service` and the rest to `inner`.
    pub fn new(inner: S, service: QueryService, token: TokenCheck, max_encoding_bytes: usize) -> Self {
        QueryRouter { inner, service, token, max_encoding_bytes }
    }
}

impl<S> NamedService for QueryRouter<S> {
    const NAME: &'static str = "rstscope.v1.Query";
}

impl<S> tower_service::Service<http::Request<Body>> for QueryRouter<S>
where
    S: tower_service::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if let Err(status) = self.token.check_headers(request.headers()) {
            return Box::pin(std::future::ready(Ok(status.into_http())));
        }
        if request.uri().path() != LIST_REPORTS_PATH {
            return Box::pin(self.inner.call(request));
        }
        let method = ListReportsEncoded(self.service.clone());
        let max_encoding_bytes = self.max_encoding_bytes;
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(EncodedCodec::<v1::ResetFilter>::default())
                .apply_max_message_size_config(Some(1 << 20), Some(max_encoding_bytes));
            Ok(grpc.server_streaming(method, request).await)
        })
    }
}
