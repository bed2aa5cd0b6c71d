#!/usr/bin/env node
// Serves the page, onnxruntime-web, a lossx artifact and (optionally) a training plan from
// 127.0.0.1 with Node's standard library: ONNX Runtime Web's WASM does not load from file://.
// Usage: node serve.js ARTIFACT_DIR [--plan PLAN.npz] [--port N]   (N = 0: any free port)
// The first line on stdout is the page's address.
'use strict';

const fs = require('node:fs');
const http = require('node:http');
const path = require('node:path');

const ROOT = path.join(__dirname, '..', '..');
const SAMPLE = path.join(ROOT, 'src/lossx/runtime/data/cifar10_test_subset.npz');
const ORT = path.join(__dirname, 'node_modules', 'onnxruntime-web', 'dist');
const TYPES = {
  '.html': 'text/html; charset=utf-8',
  '.js': 'text/javascript; charset=utf-8',
  '.mjs': 'text/javascript; charset=utf-8',
  '.wasm': 'application/wasm',
  '.json': 'application/json',
};

function fail(message) {
  process.stderr.write(`serve.js: ${message}\n`);
  process.exit(2);
}

function parseArgs(argv) {
  const usage = 'usage: node serve.js ARTIFACT_DIR [--plan PLAN.npz] [--port N]';
  const args = { dir: null, plan: null, port: 8000 };
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === '--plan' && i + 1 < argv.length) args.plan = argv[++i];
    else if (argv[i] === '--port' && i + 1 < argv.length) args.port = Number(argv[++i]);
    else if (argv[i].startsWith('-') || args.dir !== null) fail(usage);
    else args.dir = argv[i];
  }
  if (args.dir === null) fail(usage);
  if (!Number.isInteger(args.port) || args.port < 0 || args.port > 65535) fail('--port: 0..65535');
  const manifest = path.join(args.dir, 'manifest.json');
  if (!fs.existsSync(manifest)) fail(`${args.dir} is not a lossx artifact (no manifest.json)`);
  if (args.plan !== null && !fs.statSync(args.plan, { throwIfNoEntry: false })?.isFile()) {
    fail(`plan ${args.plan} does not exist`);
  }
  if (!fs.existsSync(ORT)) {
    fail('onnxruntime-web is missing: run (cd examples/web && npm ci --ignore-scripts)');
  }
  return args;
}

// What a request path may reach: the page's own files, two shared modules, onnxruntime-web's
// dist folder, the artifact's manifest and the files it lists, the sample and the plan.
function resolve(urlPath, args) {
  const artifactFiles = () => {
    const { files = {} } = JSON.parse(fs.readFileSync(path.join(args.dir, 'manifest.json')));
    return ['manifest.json', ...Object.keys(files)];
  };
  const [, top, rest] = /^\/([^/]*)\/?(.*)$/.exec(urlPath) ?? [];
  if (urlPath === '/') return path.join(__dirname, 'index.html');
  if (top === 'app.js' && !rest) return path.join(__dirname, 'app.js');
  if (top === 'lib' && ['npz.js', 'lossx.js'].includes(rest)) {
    return path.join(ROOT, 'examples', 'node', rest);
  }
  if (top === 'ort' && /^ort[\w.-]*\.(m?js|wasm)$/.test(rest)) return path.join(ORT, rest);
  if (top === 'artifact' && artifactFiles().includes(rest)) return path.join(args.dir, rest);
  if (top === 'sample.npz' && !rest) return SAMPLE;
  if (top === 'plan.npz' && !rest && args.plan) return args.plan;
  return null;
}

function main() {
  const args = parseArgs(process.argv.slice(2));
  const server = http.createServer((req, res) => {
    const urlPath = decodeURIComponent(new URL(req.url, 'http://127.0.0.1').pathname);
    const file = req.method === 'GET' ? resolve(urlPath, args) : null;
    // Cross-origin isolation lets onnxruntime-web's WASM use threads (SharedArrayBuffer).
    const headers = {
      'Cross-Origin-Opener-Policy': 'same-origin',
      'Cross-Origin-Embedder-Policy': 'require-corp',
      'Cache-Control': 'no-store',
    };
    if (file === null || !fs.existsSync(file)) {
      res.writeHead(404, { ...headers, 'Content-Type': 'text/plain' }).end('not found\n');
      return;
    }
    const type = TYPES[path.extname(file)] ?? 'application/octet-stream';
    res.writeHead(200, { ...headers, 'Content-Type': type });
    fs.createReadStream(file).pipe(res);
  });
  server.on('error', (err) => fail(`cannot listen on 127.0.0.1:${args.port}: ${err.code}`));
  server.listen(args.port, '127.0.0.1', () => {
    process.stdout.write(`http://127.0.0.1:${server.address().port}/\n`);
  });
}

main();
