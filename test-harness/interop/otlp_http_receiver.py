"""An OTLP/HTTP trace receiver, independent of the gateway's Rust stack.

Serves POST /v1/traces as the OpenTelemetry Collector's OTLP receiver does: a binary
protobuf ExportTraceServiceRequest in (Content-Type application/x-protobuf, optionally
gzip), decoded with the official `opentelemetry-proto` Python messages, and a protobuf
ExportTraceServiceResponse out. Prints `listening <port>` first, then one JSON line
per span received. `--status 503` answers every export with that status instead
(a collector shedding load), recording nothing.
"""

import argparse
import gzip
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

PROTOBUF = "application/x-protobuf"
out_lock = threading.Lock()


def any_value(v):
    kind = v.WhichOneof("value")
    if kind == "string_value":
        return v.string_value
    if kind == "int_value":
        return v.int_value
    if kind == "bool_value":
        return v.bool_value
    if kind == "double_value":
        return v.double_value
    return None if kind is None else str(getattr(v, kind))


def attributes(kvs):
    return {kv.key: any_value(kv.value) for kv in kvs}


def emit(obj):
    with out_lock:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    status = 200

    def log_message(self, *args):
        pass

    def reply(self, status, body=b"", content_type=PROTOBUF):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        if self.path != "/v1/traces":
            return self.reply(404, b"not found\n", "text/plain")
        if self.headers.get("Content-Type", "").split(";")[0].strip() != PROTOBUF:
            return self.reply(415, b"want application/x-protobuf\n", "text/plain")
        if Handler.status != 200:
            return self.reply(Handler.status, b"shedding load\n", "text/plain")
        if self.headers.get("Content-Encoding", "") == "gzip":
            body = gzip.decompress(body)
        request = ExportTraceServiceRequest()
        try:
            request.ParseFromString(body)
        except Exception as e:  # a body that is not the message: the client's fault
            return self.reply(400, str(e).encode(), "text/plain")
        for rs in request.resource_spans:
            resource = attributes(rs.resource.attributes)
            for ss in rs.scope_spans:
                for span in ss.spans:
                    emit(
                        {
                            "name": span.name,
                            "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(),
                            "parent_span_id": span.parent_span_id.hex(),
                            "kind": span.kind,
                            "attributes": attributes(span.attributes),
                            "service_name": resource.get("service.name"),
                            "scope": ss.scope.name,
                            "status_code": span.status.code,
                            "status_message": span.status.message,
                            "request_headers": {k.lower(): v for k, v in self.headers.items()},
                            "start_unix_nano": span.start_time_unix_nano,
                            "end_unix_nano": span.end_time_unix_nano,
                        }
                    )
        self.reply(200, ExportTraceServiceResponse().SerializeToString())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--status", type=int, default=200)
    args = parser.parse_args()
    Handler.status = args.status
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    emit_line = "listening %d\n" % server.server_address[1]
    sys.stdout.write(emit_line)
    sys.stdout.flush()
    server.serve_forever()


if __name__ == "__main__":
    main()
