// Bundle src/splat_viewer.js with gsplat.js into ../fastavatar_nb/assets/splat_viewer.js (one ES module,
// no imports left, nothing fetched at run time). Run: npm ci && npm run build  (or: make js).
import { readFileSync } from "node:fs";
import * as esbuild from "esbuild";

const lock = JSON.parse(readFileSync(new URL("./package-lock.json", import.meta.url)));
const gsplat = lock.packages["node_modules/gsplat"];
const license = readFileSync(new URL("./node_modules/gsplat/LICENSE", import.meta.url), "utf8");
const banner = [
  "/* fastavatar_nb splat viewer: js/src/splat_viewer.js bundled by esbuild (make js). */",
  `/* Includes gsplat.js ${gsplat.version} (https://github.com/dylanebert/gsplat.js), ${gsplat.license}:`,
  ...license.trim().split("\n").map((line) => ` * ${line}`.trimEnd()),
  " */",
].join("\n");

// gsplat.js starts its two workers from blob: URLs as module workers, and falls back to data: URLs only
// when that throws. A page without an origin (a file:// page, an exported notebook opened from disk)
// cannot start module workers from blob: URLs, and the failure comes later as an error event, so the
// fallback never runs and nothing is drawn. This plugin makes such pages take the data: URL at once.
const WORKER_FROM_BLOB = /if \(t = (\w+) && \(self\.URL \|\| self\.webkitURL\)\.createObjectURL\(\1\), !t\) throw "";/g;
const workersWithoutOrigin = {
  name: "gsplat-workers-without-origin",
  setup(build) {
    build.onLoad({ filter: /gsplat[\\/]dist[\\/]index\.es\.js$/ }, async (args) => {
      const source = readFileSync(args.path, "utf8");
      const found = source.match(WORKER_FROM_BLOB) || [];
      if (found.length !== 2) {
        throw new Error(`expected gsplat.js's 2 worker factories, found ${found.length}: update build.mjs for this version`);
      }
      const patched = source.replace(WORKER_FROM_BLOB, (m) => `if (self.origin === "null" || self.location.protocol === "file:") throw ""; ${m}`);
      return { contents: patched, loader: "js" };
    });
  },
};

await esbuild.build({
  entryPoints: [new URL("./src/splat_viewer.js", import.meta.url).pathname],
  bundle: true,
  format: "esm",
  minify: true,
  target: "es2020",
  legalComments: "none",
  banner: { js: banner },
  outfile: new URL("../fastavatar_nb/assets/splat_viewer.js", import.meta.url).pathname,
  plugins: [workersWithoutOrigin],
  logLevel: "info",
});
