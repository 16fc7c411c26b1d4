"""A moto S3 server on 127.0.0.1 for the benchmarks; boto3 reaches it through AWS_ENDPOINT_URL."""

from __future__ import annotations

import os
import socket


def start_moto(bucket: str) -> str:
    """Start the server, point the AWS environment at it, create ``bucket``; returns the endpoint."""
    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False).start()
    url = f"http://127.0.0.1:{port}"
    os.environ.update(
        AWS_ENDPOINT_URL=url,
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
    )
    boto3.client("s3").create_bucket(Bucket=bucket)
    return url
