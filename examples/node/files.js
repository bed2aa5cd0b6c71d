// The Node.js side of the examples: files read whole and checked (regular files only, sizes
// capped before anything is read), .npz files written atomically, and the one-line error report
// (exit code 2 for a refusal, 1 for anything else).
'use strict';

const crypto = require('node:crypto');
const fs = require('node:fs');
const path = require('node:path');
const zlib = require('node:zlib');

const { Refusal, npzBytes, readNpz, refuse } = require('./npz');
const { parseManifest } = require('./lossx');

const MiB = 1024 * 1024;
// The largest file of each kind read whole: a manifest is a few kB; a plan holds at most
// 100,000 images (lossx.training.plan.MAX_PLAN_IMAGES, 307 MB of pixels); artifact files and
// data files stop at Node's largest buffer.
const MAX_BYTES = {
  manifest: 16 * MiB,
  plan: 512 * MiB,
  'data file': 2048 * MiB - 1,
  'artifact file': 2048 * MiB - 1,
};

// `file` whole, if it is a regular file (a FIFO would block the read, a device never end it) of
// at most MAX_BYTES[what], or exactly `bytes` where given. Size and kind are read from the open
// descriptor, so the file cannot be swapped between the check and the read.
function readFile(file, what, bytes = null) {
  let fd;
  try {
    fd = fs.openSync(file, fs.constants.O_RDONLY | fs.constants.O_NONBLOCK);
  } catch (err) {
    return refuse(`cannot read ${what} ${file}: ${err.code || err.message}`);
  }
  try {
    const stat = fs.fstatSync(fd);
    if (stat.isDirectory()) refuse(`${what} ${file} is a folder, not a file`);
    if (!stat.isFile()) refuse(`${what} ${file} is not a regular file (a FIFO, socket or device)`);
    const limit = MAX_BYTES[what];
    if (stat.size > limit) refuse(`${what} ${file} is ${stat.size.toLocaleString('en')} bytes, over the ${limit.toLocaleString('en')} an example reads`);
    if (bytes !== null && stat.size !== bytes) {
      refuse(`${file}: ${stat.size.toLocaleString('en')} bytes, the manifest says ${bytes.toLocaleString('en')}`);
    }
    const out = Buffer.alloc(stat.size);
    let done = 0;
    while (done < out.length) {
      const n = fs.readSync(fd, out, done, out.length - done, done);
      if (n === 0) refuse(`${what} ${file} shrank while being read`);
      done += n;
    }
    return out;
  } catch (err) {
    if (err instanceof Refusal) throw err;
    return refuse(`cannot read ${what} ${file}: ${err.code || err.message}`);
  } finally {
    fs.closeSync(fd);
  }
}

// zlib with the output capped at the entry's declared size: a zip bomb stops there.
function inflateRaw(raw, size) {
  return zlib.inflateRawSync(raw, { maxOutputLength: Math.max(size, 1) });
}

function readNpzFile(file, what) {
  const bytes = readFile(file, what);
  try {
    return readNpz(bytes, file, inflateRaw);
  } catch (err) {
    // A corrupt deflate stream, or one longer than declared, shows up as a zlib error.
    if (err instanceof Refusal) throw err;
    return refuse(`${file} is not a readable .npz: ${err.message}`);
  }
}

function readManifest(dir) {
  const file = path.join(dir, 'manifest.json');
  return { file, manifest: parseManifest(readFile(file, 'manifest').toString('utf8'), file) };
}

// An artifact's file (a name parseManifest checked to be plain: it stays inside `dir`), not a
// link, of the size and sha256 the manifest lists. Apps load these bytes, so the file cannot
// change between the check and the load.
function readChecked(dir, manifest, name) {
  const file = path.join(dir, name);
  if (fs.lstatSync(file, { throwIfNoEntry: false })?.isSymbolicLink()) {
    refuse(`${file}: refusing a link; artifact files must be regular files`);
  }
  const { sha256, bytes: size } = manifest.files[name];
  const bytes = readFile(file, 'artifact file', size);
  const digest = crypto.createHash('sha256').update(bytes).digest('hex');
  if (digest !== sha256) refuse(`${file}: sha256 ${digest} does not match the manifest's ${sha256}`);
  return bytes;
}

// Whether `file` holds numpy arrays (a zip of .npy files, as lossx and this code write), by
// its content: what train.js may overwrite.
function isNpz(file) {
  try {
    const fd = fs.openSync(file, 'r');
    try {
      if (!fs.fstatSync(fd).isFile()) return false;
      const head = Buffer.alloc(4);
      fs.readSync(fd, head, 0, 4, 0);
      if (!head.equals(Buffer.from('PK\x03\x04', 'latin1'))) return false;
    } finally {
      fs.closeSync(fd);
    }
    const { zipEntries } = require('./npz');
    const entries = zipEntries(readFile(file, 'data file'), file);
    return entries.length > 0 && entries.every((e) => e.name.endsWith('.npy'));
  } catch {
    return false;
  }
}

// Refuses, before any work, an output .npz that cannot be written or would replace a file that
// is not an .npz of arrays (a source file, a checkpoint of torch).
function checkOutputNpz(file) {
  const folder = path.dirname(path.resolve(file));
  const stat = fs.statSync(file, { throwIfNoEntry: false });
  if (stat?.isDirectory()) refuse(`cannot write ${file}: it is a folder; give a file name`);
  if (stat && !stat.isFile()) refuse(`cannot write ${file}: it is not a regular file`);
  if (stat && !isNpz(file)) {
    refuse(`--out ${file} exists and is not an .npz of weights; refusing to overwrite it (choose another --out)`);
  }
  if (!fs.statSync(folder, { throwIfNoEntry: false })?.isDirectory()) {
    refuse(`cannot write ${file}: folder ${folder} does not exist`);
  }
  try {
    fs.accessSync(folder, fs.constants.W_OK);
  } catch {
    refuse(`cannot write ${file}: folder ${folder} is not writable`);
  }
}

// Writes arrays ({ name: { typed, shape } }) as an uncompressed .npz: the file appears whole
// (written to a hidden file beside it, then renamed) or not at all.
function writeNpzFile(file, arrays) {
  const partial = path.join(path.dirname(file), `.${path.basename(file)}.${process.pid}.partial`);
  try {
    fs.writeFileSync(partial, npzBytes(arrays), { flag: 'wx' });
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

// An ONNX Runtime session for an artifact graph's bytes, checked to have the inputs and outputs
// the manifest lists: a graph ONNX Runtime cannot load (external data, a damaged file) or one
// swapped for another is a refusal of the artifact (exit 2), like Python's.
async function openSession(ort, bytes, manifest, file, options = {}) {
  const graph = manifest.graphs.find((g) => g.file === file);
  let session;
  try {
    session = await ort.InferenceSession.create(bytes, options);
  } catch (err) {
    refuse(`${file}: ONNX Runtime cannot load it: ${String(err?.message ?? err).split('\n')[0]}`);
  }
  const names = (tensors) => JSON.stringify((tensors ?? []).map((t) => t.name));
  if (names(graph.inputs) !== JSON.stringify(session.inputNames) ||
      names(graph.outputs) !== JSON.stringify(session.outputNames)) {
    refuse(`${file}: its inputs and outputs (${session.inputNames}; ${session.outputNames}) ` +
      'are not the ones the manifest lists (graph swapped or manifest edited)');
  }
  return session;
}

// Runs an async main; one line on stderr, never a stack trace.
function runMain(name, main) {
  main().catch((err) => {
    const message = String(err?.message ?? err).split('\n')[0];
    process.stderr.write(`${name}: ${message}\n`);
    process.exitCode = err instanceof Refusal ? 2 : 1;
  });
}

module.exports = { checkOutputNpz, inflateRaw, loadOnnxRuntime, openSession, readChecked, readFile,
  readManifest, readNpzFile, runMain, writeNpzFile };
