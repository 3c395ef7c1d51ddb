# Parses a metrics exposition with the Prometheus project's own Python parsers and prints the
# samples as JSON: [[name, labels, value], ...]. argv[1]: "openmetrics" (strict OpenMetrics 1.0
# parser; rejects any deviation) or "prometheus" (the text format 0.0.4 parser).
import json
import sys

from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_prometheus

text = sys.stdin.read()
parse = parse_openmetrics if sys.argv[1] == "openmetrics" else parse_prometheus
out = {"families": [], "samples": []}
for family in parse(text):
    out["families"].append([family.name, family.type, family.documentation])
    for s in family.samples:
        out["samples"].append([s.name, s.labels, s.value])
print(json.dumps(out))
