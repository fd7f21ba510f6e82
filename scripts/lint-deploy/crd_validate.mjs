// Validates monitoring.coreos.com objects (PodMonitor, PrometheusRule, ...)
// against the Prometheus Operator CRD schemas that the npm package
// @kubernetes-models/prometheus-operator compiles into validators.
// It checks types, required fields, enums and patterns; unlike the built-in
// kinds it does not reject unknown fields.
//
// usage: node crd_validate.mjs NODE_MODULES_DIR < [{"source": "...", "doc": {...}}, ...]
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const modules = process.argv[2];
const items = JSON.parse(readFileSync(0, "utf8"));
let failed = 0;

for (const { source, doc } of items) {
  const [group, version] = String(doc.apiVersion).split("/");
  const file = join(modules, "@kubernetes-models/prometheus-operator", group, version, `${doc.kind}.js`);
  let Model;
  try {
    Model = (await import(pathToFileURL(file).href))[doc.kind];
  } catch {
    console.log(`FAIL ${source}: no CRD schema for ${doc.apiVersion} ${doc.kind}`);
    failed++;
    continue;
  }
  try {
    new Model(doc).validate();
    console.log(`ok   ${source}: CRD schema ${doc.apiVersion}`);
  } catch (e) {
    console.log(`FAIL ${source}: ${e.message}`);
    failed++;
  }
}
process.exit(failed ? 1 : 0);
