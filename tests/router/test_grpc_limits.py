"""The public gRPC server's bounds (protos/grpc_options.PUBLIC_SERVER): a request larger than the
HTTP API's body limit is refused by gRPC itself, and the router goes on serving."""

from __future__ import annotations

import grpc
import pytest

from pagedserve.protos import generation_pb2 as pb
from pagedserve.protos import generation_pb2_grpc, grpc_options


def test_an_oversized_request_is_resource_exhausted_and_the_next_is_served(router) -> None:
    with grpc.insecure_channel(router.grpc_address,
                               options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        big = "x" * (grpc_options.PUBLIC_MAX_REQUEST_BYTES + 1024)
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(pb.GenerateRequest(prompt=big, max_tokens=1)))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        out = list(stub.Generate(pb.GenerateRequest(prompt="Hello", max_tokens=2)))
        assert out[-1].finish_reason == "length"
