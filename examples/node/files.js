// The Node.js side of the examples: files read whole and checked, .npz files written atomically,
// and the one-line error report (exit code 2 for a refusal, 1 for anything else).
'use strict';

const crypto = require('node:crypto');
const fs = require('node:fs');
const path = require('node:path');
const zlib = require('node:zlib');

const { Refusal, npzBytes, readNpz, refuse } = require('./npz');
const { parseManifest } = require('./lossx');

function readFile(file, what) {
  try {
    return fs.readFileSync(file);
  } catch (err) {
    return refuse(`cannot read ${what} ${file}: ${err.code || err.message}`);
  }
}

function readNpzFile(file, what) {
  const bytes = readFile(file, what);
  try {
    return readNpz(bytes, file, zlib.inflateRawSync);
  } catch (err) {
    // A corrupt deflate stream shows up as a zlib error.
    if (err instanceof Refusal) throw err;
    return refuse(`${file} is not a readable .npz: ${err.message}`);
  }
}

function readManifest(dir) {
  const file = path.join(dir, 'manifest.json');
  return { file, manifest: parseManifest(readFile(file, 'manifest').toString('utf8'), file) };
}

// An artifact's file, checked against the manifest's sha256. Apps load these bytes, so the file
// cannot change between the check and the load.
function readChecked(dir, name, sha256) {
  const file = path.join(dir, name);
  const bytes = readFile(file, 'artifact file');
  const digest = crypto.createHash('sha256').update(bytes).digest('hex');
  if (digest !== sha256) refuse(`${file}: sha256 ${digest} does not match the manifest's ${sha256}`);
  return bytes;
}

// Writes arrays ({ name: { typed, shape } }) as an uncompressed .npz: the file appears whole
// (written beside it, then renamed) or not at all.
function writeNpzFile(file, arrays) {
  const partial = `${file}.partial-${process.pid}`;
  try {
    fs.writeFileSync(partial, npzBytes(arrays));
    fs.renameSync(partial, file);
  } catch (err) {
    fs.rmSync(partial, { force: true });
    refuse(`cannot write ${file}: ${err.code || err.message}`);
  }
}

function loadOnnxRuntime() {
  try {
    return require('onnxruntime-node');
  } catch {
    return refuse('onnxruntime-node is missing: run (cd examples/node && npm ci --ignore-scripts)');
  }
}

// Runs an async main; one line on stderr, never a stack trace.
function runMain(name, main) {
  main().catch((err) => {
    const message = String(err?.message ?? err).split('\n')[0];
    process.stderr.write(`${name}: ${message}\n`);
    process.exitCode = err instanceof Refusal ? 2 : 1;
  });
}

module.exports = { loadOnnxRuntime, readChecked, readFile, readManifest, readNpzFile, runMain,
  writeNpzFile };
