"""Local stand-ins for object storage, for tests and benchmarks: an HTTP server that honours byte
ranges (as S3, GCS and nginx do) and an S3-compatible server (moto's server mode). Both listen on
127.0.0.1 on a free port, count the bytes they send, and stop when their `with` block ends."""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class _RangeHandler(SimpleHTTPRequestHandler):
    """SimpleHTTPRequestHandler plus single `Range: bytes=a-b` requests (206 Partial Content)."""

    sent: list[int]  # bytes of every response body, shared by the server's handlers
    delay: float = 0.0  # seconds before each response: an object store's time to first byte

    def log_message(self, *args) -> None:  # quiet: tests read stderr
        pass

    def do_GET(self) -> None:
        time.sleep(self.delay)
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        path = Path(self.translate_path(self.path))
        if not m or not path.is_file():
            f = self.send_head()
            if f:
                with f:
                    body = f.read()
                self.wfile.write(body)
                self.sent.append(len(body))
            return
        size = path.stat().st_size
        start, end = int(m[1]), min(int(m[2]) if m[2] else size - 1, size - 1)
        with open(path, "rb") as f:
            f.seek(start)
            body = f.read(max(0, end - start + 1))
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.sent.append(len(body))


class _Server(ThreadingHTTPServer):
    request_queue_size = 256  # clients fetch a batch's ranges at once: the default backlog of 5 drops them
    daemon_threads = True


@contextlib.contextmanager
def http_server(root: Path, delay: float = 0.0) -> Iterator[tuple[str, list[int]]]:
    """(base URL ending in /, list of response sizes) serving `root`, each response `delay` s late."""
    sent: list[int] = []
    handler = type("Handler", (_RangeHandler,), {"sent": sent, "delay": delay})
    server = _Server(("127.0.0.1", 0), partial(handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", sent
    finally:
        server.shutdown()
        server.server_close()


S3_ENV = {  # moto accepts any credentials; these are what the client signs with
    "AWS_ACCESS_KEY_ID": "testing-key-id",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-key-0123456789",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@contextlib.contextmanager
def s3_server(root: Path, bucket: str = "data", prefix: str = "shards") -> Iterator[dict[str, str]]:
    """An S3-compatible server holding `root`'s files under s3://bucket/prefix/; yields the
    environment a client needs (endpoint and credentials), which the caller applies."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        env = {**S3_ENV, "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
        import boto3

        s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                          aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
        s3.create_bucket(Bucket=bucket)
        for p in sorted(root.rglob("*")):
            if p.is_file() and not p.relative_to(root).parts[0].startswith("."):
                s3.upload_file(str(p), bucket, f"{prefix}/{p.relative_to(root).as_posix()}")
        yield {**env, "CDC_TEST_S3_URL": f"s3://{bucket}/{prefix}/"}
    finally:
        server.stop()


def set_env(monkeypatch, env: dict[str, str]) -> None:
    """Point S3 clients at a test server: its environment, and no S3 filesystem cached with an
    earlier server's endpoint (fsspec keeps one instance per set of arguments in a process)."""
    import s3fs

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    s3fs.S3FileSystem.clear_instance_cache()
