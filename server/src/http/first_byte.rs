//! A deadline for a connection's first byte. hyper's header read timeout covers a request's head once
//! it has begun, but hyper-util reads the first bytes (to tell HTTP/1 from HTTP/2) with no timer, so
//! without this a client could hold a plain-HTTP connection open for ever by sending nothing. (Over
//! TLS, the handshake has a timeout of its own.)

use std::time::Duration;

/// Gives each connection that the inner acceptor (`.1`) accepted the header read timeout (`.0`) to send
/// its first byte (see [`FirstByteDeadline`]).
#[derive(Debug, Clone, Copy)]
pub struct FirstByteAcceptor<A>(pub Duration, pub A);

// The inner acceptor must answer at once (`Ready`), as axum-server's own do, so that this one can too.
impl<I, S, A, T, U> axum_server::accept::Accept<I, S> for FirstByteAcceptor<A>
where
    A: axum_server::accept::Accept<
            I,
            S,
            Stream = T,
            Service = U,
            Future = std::future::Ready<std::io::Result<(T, U)>>,
        >,
{
    type Stream = FirstByteDeadline<T>;
    type Service = U;
    type Future = std::future::Ready<std::io::Result<(Self::Stream, Self::Service)>>;

    fn accept(&self, stream: I, service: S) -> Self::Future {
        let accepted = self.1.accept(stream, service).into_inner();
        std::future::ready(accepted.map(|(stream, service)| {
            (
                FirstByteDeadline {
                    inner: stream,
                    deadline: Some(Box::pin(tokio::time::sleep(self.0))),
                },
                service,
            )
        }))
    }
}

/// A connection that must send its first byte before a deadline, or its read fails with `TimedOut`
/// and the connection is closed. hyper's header read timeout covers the rest of a request's head, but
/// hyper-util reads the first bytes (to tell HTTP/1 from HTTP/2) with no timer, so without this a client
/// could hold a connection open for ever by sending nothing.
pub struct FirstByteDeadline<I> {
    inner: I,
    /// None once a byte has arrived.
    deadline: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<I: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for FirstByteDeadline<I> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::future::Future;
        use std::task::Poll;
        let this = &mut *self;
        match std::pin::Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(result) => {
                this.deadline = None;
                Poll::Ready(result)
            }
            Poll::Pending => {
                let expired = this
                    .deadline
                    .as_mut()
                    .is_some_and(|deadline| deadline.as_mut().poll(cx).is_ready());
                if expired {
                    Poll::Ready(Err(std::io::ErrorKind::TimedOut.into()))
                } else {
                    Poll::Pending
                }
            }
        }
    }
}

impl<I: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for FirstByteDeadline<I> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
