"""Malformed request bytes are the caller's error: INVALID_ARGUMENT, not INTERNAL.

grpcio decodes a request before the servicer runs and answers a message it cannot parse with
INTERNAL ("Exception deserializing request!"), which reads as a bug of the controller. This
interceptor takes the decoding over for every method: it hands the servicer what the method's
own deserializer returns and answers a message that does not parse with INVALID_ARGUMENT naming
the method. Streams of requests are decoded message by message the same way.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc
from google.protobuf.message import DecodeError


class DecodeErrorInterceptor(grpc.ServerInterceptor):
    def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        handler = continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        decode = handler.request_deserializer
        method = handler_call_details.method
        if handler.request_streaming:
            kind = "stream_stream" if handler.response_streaming else "stream_unary"
            inner = getattr(handler, kind)

            def streaming(requests: Iterator[bytes], context: grpc.ServicerContext) -> Any:
                return inner(_decoded_stream(requests, decode, method, context), context)

            return handler._replace(request_deserializer=None, **{kind: streaming})
        kind = "unary_stream" if handler.response_streaming else "unary_unary"
        inner = getattr(handler, kind)
        if inspect.isasyncgenfunction(inner):  # a follow-stream of the asyncio server
            async def unary_async(request: bytes, context: Any) -> AsyncIterator[Any]:
                try:
                    decoded = decode(request)
                except (DecodeError, ValueError, TypeError) as exc:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _invalid(method, exc))
                async for message in inner(decoded, context):
                    yield message

            return handler._replace(request_deserializer=None, unary_stream=unary_async)

        def unary(request: bytes, context: grpc.ServicerContext) -> Any:
            return inner(_decode(request, decode, method, context), context)

        return handler._replace(request_deserializer=None, **{kind: unary})


def _decode(raw: bytes, decode: Callable[[bytes], Any], method: str,
            context: grpc.ServicerContext) -> Any:
    try:
        return decode(raw)
    except (DecodeError, ValueError, TypeError) as exc:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, _invalid(method, exc))


def _invalid(method: str, exc: Exception) -> str:
    return f"request to {method} is not a valid protobuf message: {exc}"


def _decoded_stream(requests: Iterator[bytes], decode: Callable[[bytes], Any], method: str,
                    context: grpc.ServicerContext) -> Iterator[Any]:
    for raw in requests:
        yield _decode(raw, decode, method, context)
