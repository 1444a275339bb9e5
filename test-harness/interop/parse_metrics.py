"""Parses a /metrics scrape (stdin) with the official Prometheus Python client's parsers.

    parse_metrics.py text         # the Prometheus text format 0.0.4
    parse_metrics.py openmetrics  # OpenMetrics 1.0 (strict: `# EOF`, counter naming)

Prints one JSON object: {"families": [{"name", "type", "samples": [{"name", "labels",
"value"}]}]}; exits 1 with the parser's message when the input does not parse.
"""

import json
import sys

from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families as parse_text


def main():
    fmt = sys.argv[1]
    text = sys.stdin.read()
    parse = {"text": parse_text, "openmetrics": parse_openmetrics}[fmt]
    try:
        families = [
            {
                "name": f.name,
                "type": f.type,
                "samples": [
                    {"name": s.name, "labels": s.labels, "value": s.value}
                    for s in f.samples
                ],
            }
            for f in parse(text)
        ]
    except Exception as e:  # the parser's own message is the point
        print("%s: %s" % (type(e).__name__, e), file=sys.stderr)
        sys.exit(1)
    json.dump({"families": families}, sys.stdout)


if __name__ == "__main__":
    main()
