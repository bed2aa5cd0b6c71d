#!/usr/bin/env node
// Serves the page, onnxruntime-web, a lossx artifact and (optionally) a training plan from
// 127.0.0.1 with Node's standard library: ONNX Runtime Web's WASM does not load from file://.
// Usage: node serve.js ARTIFACT_DIR [--plan PLAN.npz] [--sample NPZ] [--port N]
// (N = 0: any free port; NPZ: labelled images at the artifact's size, default CIFAR-10's sample)
// The first line on stdout is the page's address.
//
// The artifact is checked once, at start-up, with the rules lossx's Python loader applies: the
// manifest parses and passes lossx.js's checks (plain file names, a size and sha256 each), and
// every file it lists is a regular file of that size and sha256. Those bytes are then served
// from memory, and nothing else of the artifact's folder: no request can reach another file.
'use strict';

const fs = require('node:fs');
const http = require('node:http');
const path = require('node:path');

const { Refusal } = require('../node/npz');
const { parseManifest } = require('../node/lossx');
const { readChecked, readFile } = require('../node/files');

const ROOT = path.join(__dirname, '..', '..');
const SAMPLE = path.join(ROOT, 'src/lossx/runtime/data/cifar10_test_subset.npz');
const ORT = path.join(__dirname, 'node_modules', 'onnxruntime-web', 'dist');
const TYPES = {
  '.html': 'text/html; charset=utf-8',
  '.js': 'text/javascript; charset=utf-8',
  '.mjs': 'text/javascript; charset=utf-8',
  '.wasm': 'application/wasm',
  '.json': 'application/json',
  '.npz': 'application/octet-stream',
  '.onnx': 'application/octet-stream',
};

function fail(message) {
  process.stderr.write(`serve.js: ${message}\n`);
  process.exit(2);
}

function parseArgs(argv) {
  const usage = 'usage: node serve.js ARTIFACT_DIR [--plan PLAN.npz] [--sample NPZ] [--port N]';
  const args = { dir: null, plan: null, sample: null, port: 8000 };
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === '--plan' && i + 1 < argv.length) args.plan = argv[++i];
    else if (argv[i] === '--sample' && i + 1 < argv.length) args.sample = argv[++i];
    else if (argv[i] === '--port' && i + 1 < argv.length) args.port = Number(argv[++i]);
    else if (argv[i].startsWith('-') || args.dir !== null) fail(usage);
    else args.dir = argv[i];
  }
  if (args.dir === null) fail(usage);
  if (!Number.isInteger(args.port) || args.port < 0 || args.port > 65535) fail('--port: 0..65535');
  return args;
}

// Everything a request may receive, read and checked now: URL path -> { bytes, type } for the
// artifact's files and the plan, and URL path -> file for the page's own files.
function servedFiles(args) {
  const file = path.join(args.dir, 'manifest.json');
  const manifestBytes = readFile(file, 'manifest');
  const manifest = parseManifest(manifestBytes.toString('utf8'), file);
  const artifact = new Map([['/artifact/manifest.json', manifestBytes]]);
  for (const name of Object.keys(manifest.files)) {
    artifact.set(`/artifact/${name}`, readChecked(args.dir, manifest, name));
  }
  if (args.plan !== null) artifact.set('/plan.npz', readFile(args.plan, 'plan'));
  artifact.set('/sample.npz', readFile(args.sample ?? SAMPLE, 'sample'));
  const fixed = new Map([
    ['/', path.join(__dirname, 'index.html')],
    ['/app.js', path.join(__dirname, 'app.js')],
    ['/lib/npz.js', path.join(ROOT, 'examples', 'node', 'npz.js')],
    ['/lib/lossx.js', path.join(ROOT, 'examples', 'node', 'lossx.js')],
  ]);
  return { artifact, fixed };
}

// The file a (decoded) URL path names: an artifact file, a page file, or one of
// onnxruntime-web's own (a plain name in its dist folder); null for anything else.
function resolve(urlPath, served) {
  if (served.artifact.has(urlPath)) return { bytes: served.artifact.get(urlPath) };
  if (served.fixed.has(urlPath)) return { file: served.fixed.get(urlPath) };
  const ort = /^\/ort\/(ort[\w-]*(\.[\w-]+)*\.(m?js|wasm))$/.exec(urlPath);
  if (ort) return { file: path.join(ORT, ort[1]) };
  return null;
}

function respond(res, status, headers, body) {
  res.writeHead(status, headers).end(body);
}

function handle(req, res, served) {
  // Cross-origin isolation lets onnxruntime-web's WASM use threads (SharedArrayBuffer).
  const headers = {
    'Cross-Origin-Opener-Policy': 'same-origin',
    'Cross-Origin-Embedder-Policy': 'require-corp',
    'Cache-Control': 'no-store',
  };
  const text = { ...headers, 'Content-Type': 'text/plain' };
  if (req.method !== 'GET' && req.method !== 'HEAD') {
    respond(res, 405, { ...text, Allow: 'GET, HEAD' }, 'method not allowed\n');
    return;
  }
  let urlPath;
  try {
    urlPath = decodeURIComponent(new URL(req.url, 'http://127.0.0.1').pathname);
  } catch {
    respond(res, 400, text, 'bad request: the path is not a valid URL\n');
    return;
  }
  const found = urlPath.includes('\0') ? null : resolve(urlPath, served);
  let bytes = found?.bytes;
  if (found?.file) {
    try {
      bytes = readFile(found.file, 'data file');
    } catch {
      bytes = undefined; // e.g. onnxruntime-web has no such file
    }
  }
  if (bytes === undefined) {
    respond(res, 404, text, 'not found\n');
    return;
  }
  const type = TYPES[path.extname(urlPath === '/' ? 'index.html' : urlPath)];
  respond(res, 200, { ...headers, 'Content-Type': type ?? 'application/octet-stream' },
    req.method === 'HEAD' ? undefined : bytes);
}

function main() {
  const args = parseArgs(process.argv.slice(2));
  let served;
  try {
    served = servedFiles(args);
  } catch (err) {
    fail(err instanceof Refusal ? err.message : `cannot read the artifact: ${err.message}`);
  }
  if (!readable(ORT)) fail('onnxruntime-web is missing: run (cd examples/web && npm ci --ignore-scripts)');
  const server = http.createServer((req, res) => {
    try {
      handle(req, res, served);
    } catch (err) {
      // No request may end the server: answer 500 and say why on stderr, in one line.
      process.stderr.write(`serve.js: ${req.method} ${JSON.stringify(req.url)}: ${String(err?.message ?? err).split('\n')[0]}\n`);
      if (!res.headersSent) respond(res, 500, { 'Content-Type': 'text/plain' }, 'server error\n');
      else res.destroy();
    }
  });
  server.on('clientError', (err, socket) => socket.destroy());
  server.on('error', (err) => fail(`cannot listen on 127.0.0.1:${args.port}: ${err.code}`));
  server.listen(args.port, '127.0.0.1', () => {
    process.stdout.write(`http://127.0.0.1:${server.address().port}/\n`);
  });
}

function readable(folder) {
  return fs.statSync(folder, { throwIfNoEntry: false })?.isDirectory() ?? false;
}

main();
