// Checks custom resources (ServiceMonitor, PrometheusRule, ScaledObject) against their upstream
// models (npm @kubernetes-models/*, generated from the projects' CRDs), twice:
//  * the TypeScript compiler on each object as a literal of the CRD's interface: unknown fields
//    anywhere (excess properties) and wrong types are compile errors;
//  * the runtime JSON-schema validator of the same models (required fields, enums, formats).
// Usage: node crd_check.mjs <tools dir> <objects.json>; prints {"checked": n, "errors": [..]}.
import { existsSync, readFileSync, writeFileSync, mkdtempSync, rmSync } from "node:fs";
import { join } from "node:path";
import { execFileSync } from "node:child_process";

const [tools, input] = process.argv.slice(2);
const objects = JSON.parse(readFileSync(input, "utf8"));
const KINDS = {
  "monitoring.coreos.com/v1/ServiceMonitor": ["@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor", "IServiceMonitor"],
  "monitoring.coreos.com/v1/PrometheusRule": ["@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule", "IPrometheusRule"],
  "keda.sh/v1alpha1/ScaledObject": ["@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject", "IScaledObject"],
};
const errors = [];
const dir = mkdtempSync(join(tools, "check-"));
try {
  let ts = "";
  const runtime = [];
  objects.forEach((o, i) => {
    const key = `${o.apiVersion}/${o.kind}`;
    const model = KINDS[key];
    if (!model) { errors.push(`${key}: no upstream model known to the checker`); return; }
    ts += `import type { ${model[1]} as T${i} } from "${model[0]}";\n`;
    ts += `export const o${i}: T${i} = ${JSON.stringify(o)};\n`;
    runtime.push([i, model, o]);
  });
  writeFileSync(join(dir, "objects.ts"), ts);
  writeFileSync(join(dir, "tsconfig.json"), JSON.stringify({
    compilerOptions: { strict: true, noEmit: true, module: "nodenext", moduleResolution: "nodenext",
      target: "es2022", skipLibCheck: true, types: [] },
    files: ["objects.ts"],
  }));
  try {
    execFileSync(process.execPath, [join(tools, "node_modules/typescript/bin/tsc"), "-p", dir], { encoding: "utf8" });
  } catch (e) {
    errors.push(...String(e.stdout || e.message).split("\n").filter((l) => l.includes("error TS")));
  }
  for (const [i, model, o] of runtime) {
    const base = join(tools, "node_modules", model[0]);
    const mod = await import(existsSync(base + ".mjs") ? base + ".mjs" : base + ".js");
    const Cls = Object.values(mod).find((v) => typeof v === "function" && v.kind === o.kind);
    try {
      new Cls(o).validate();
    } catch (e) {
      errors.push(`${o.kind} ${o.metadata?.name} (#${i}): ${e.message}`);
    }
  }
} finally {
  rmSync(dir, { recursive: true, force: true });
}
console.log(JSON.stringify({ checked: objects.length, errors }));
