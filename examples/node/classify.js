#!/usr/bin/env node
// Classify CIFAR-10 images with a lossx artifact, using onnxruntime-node and Node's standard
// library only: no Python, no numpy. Usage: node classify.js ARTIFACT_DIR [--data NPZ] [--json]
'use strict';

const crypto = require('node:crypto');
const fs = require('node:fs');
const path = require('node:path');
const zlib = require('node:zlib');

const DEFAULT_DATA = path.join(__dirname, '../../src/lossx/runtime/data/cifar10_test_subset.npz');
const BATCH = 256;
const [H, W, C] = [32, 32, 3];

// The preprocessing this script implements, word for word as lossx writes it in the manifest.
// The fields are prose, so anything else (a mean/std, another layout) is refused, not guessed.
const PREPROCESSING = {
  input: 'uint8 RGB images, HWC layout, shape [N,32,32,3]',
  output: 'float32 NCHW tensor, shape [N,3,32,32]',
  scale: 'x / 255 (float32), no mean or std normalisation',
};
// Fields that ask nothing of this script: `equivalent` restates the steps above, and `files` says
// how lossx decodes image files, while the .npz already holds decoded uint8 RGB 32x32 arrays.
const PREPROCESSING_NOTES = new Set(['equivalent', 'files']);

// A refusal: bad input that the user can fix. Reported in one line with exit code 2.
class Refusal extends Error {}
const refuse = (message) => {
  throw new Refusal(message);
};

function parseArgs(argv) {
  const usage = 'usage: node classify.js ARTIFACT_DIR [--data NPZ] [--json]';
  const args = { dir: null, data: DEFAULT_DATA, json: false };
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === '--json') args.json = true;
    else if (argv[i] === '--data' && i + 1 < argv.length) args.data = argv[++i];
    else if (argv[i].startsWith('-') || args.dir !== null) refuse(usage);
    else args.dir = argv[i];
  }
  if (args.dir === null) refuse(usage);
  return args;
}

function readFile(file, what) {
  try {
    return fs.readFileSync(file);
  } catch (err) {
    return refuse(`cannot read ${what} ${file}: ${err.code || err.message}`);
  }
}

// --- manifest -------------------------------------------------------------------------------

function readManifest(dir) {
  const file = path.join(dir, 'manifest.json');
  let manifest;
  try {
    manifest = JSON.parse(readFile(file, 'manifest').toString('utf8'));
  } catch (err) {
    if (err instanceof Refusal) throw err;
    refuse(`${file} is not valid JSON: ${err.message}`);
  }
  if (manifest?.format !== 'lossx-artifact' || manifest.format_version !== 3) {
    refuse(`${file} is not a lossx artifact manifest of format_version 3`);
  }
  const graph = (manifest.graphs || []).find((g) => g.kind === 'model');
  const [input, output] = [graph?.inputs?.[0], graph?.outputs?.[0]];
  if (graph?.inputs?.length !== 1 || graph.outputs?.length !== 1) {
    refuse(`${file}: expected one model graph with one input and one output`);
  }
  if (input.dtype !== 'float32' || JSON.stringify(input.shape?.slice(1)) !== '[3,32,32]') {
    refuse(`${file}: model input ${JSON.stringify(input)} is not float32 [N,3,32,32]`);
  }
  const classNames = manifest.class_names;
  if (!Array.isArray(classNames) || output.shape?.[1] !== classNames.length) {
    refuse(`${file}: model output shape ${JSON.stringify(output.shape)} does not fit class_names`);
  }
  const sha256 = manifest.files?.[graph.file]?.sha256;
  if (!/^[0-9a-f]{64}$/.test(sha256)) refuse(`${file}: no sha256 for ${graph.file}`);
  checkPreprocessing(manifest.preprocessing, file);
  const precision = manifest.precision?.name ?? 'fp32'; // fp32, int8 or fp16: same inputs
  const names = { input: input.name, output: output.name };
  return { file: graph.file, sha256, ...names, classNames, precision };
}

function checkPreprocessing(pre, file) {
  if (typeof pre !== 'object' || pre === null) refuse(`${file}: no preprocessing section`);
  for (const key of new Set([...Object.keys(pre), ...Object.keys(PREPROCESSING)])) {
    if (PREPROCESSING_NOTES.has(key) || pre[key] === PREPROCESSING[key]) continue;
    const found = key in pre ? JSON.stringify(pre[key]) : 'missing';
    const want = PREPROCESSING[key];
    const known = want === undefined ? 'no such step' : `only ${JSON.stringify(want)}`;
    refuse(`${file}: preprocessing.${key} is ${found}; this example implements ${known}`);
  }
}

// --- .npz: a zip of .npy files ------------------------------------------------------------------

// Reads every entry of a zip through its central directory (stored or deflate, no zip64).
function readZip(buf, file) {
  const bad = (why) => refuse(`${file} is not a readable .npz: ${why}`);
  // The end-of-central-directory record sits in the last 22 + 65535 (comment) bytes.
  let eocd = -1;
  for (let i = buf.length - 22; i >= Math.max(0, buf.length - 22 - 0xffff); i--) {
    if (buf.readUInt32LE(i) === 0x06054b50) {
      eocd = i;
      break;
    }
  }
  if (eocd < 0) bad('no zip end-of-central-directory record');
  const count = buf.readUInt16LE(eocd + 10);
  let p = buf.readUInt32LE(eocd + 16);
  if (count === 0xffff || p === 0xffffffff) bad('zip64 archives are not supported');
  const entries = {};
  for (let n = 0; n < count; n++) {
    if (p + 46 > buf.length || buf.readUInt32LE(p) !== 0x02014b50) bad('corrupt central directory');
    const flags = buf.readUInt16LE(p + 8);
    const method = buf.readUInt16LE(p + 10);
    const crc = buf.readUInt32LE(p + 16);
    const packed = buf.readUInt32LE(p + 20);
    const size = buf.readUInt32LE(p + 24);
    const nameLen = buf.readUInt16LE(p + 28);
    const local = buf.readUInt32LE(p + 42);
    const name = buf.toString('utf8', p + 46, p + 46 + nameLen);
    p += 46 + nameLen + buf.readUInt16LE(p + 30) + buf.readUInt16LE(p + 32);
    if (flags & 1) bad(`${name} is encrypted`);
    if ([packed, size, local].includes(0xffffffff)) bad(`${name} needs zip64`);
    if (buf.readUInt32LE(local) !== 0x04034b50) bad(`${name}: corrupt local header`);
    // The local header's own name and extra lengths (its zip64 extra may differ) locate the data.
    const start = local + 30 + buf.readUInt16LE(local + 26) + buf.readUInt16LE(local + 28);
    const raw = buf.subarray(start, start + packed);
    let data;
    if (method === 0) data = raw;
    else if (method === 8) data = zlib.inflateRawSync(raw);
    else bad(`${name} uses compression method ${method} (only stored and deflate)`);
    if (data.length !== size) bad(`${name} has ${data.length} bytes, expected ${size}`);
    // zlib.crc32 arrived in Node 20.15; older Nodes skip the check.
    if (zlib.crc32 && zlib.crc32(data) !== crc) bad(`${name} fails its CRC-32 check`);
    entries[name] = data;
  }
  return entries;
}

// Parses a .npy file (format 1.0-3.0), C order, of the little-endian integer dtypes listed here.
const DTYPES = { '|u1': 1, '<i4': 4, '<i8': 8 };

function readNpy(buf, name) {
  const bad = (why) => refuse(`${name}: ${why}`);
  if (buf.length < 10 || buf.toString('latin1', 0, 6) !== '\x93NUMPY') bad('not a .npy file');
  const major = buf[6];
  if (![1, 2, 3].includes(major)) bad(`unsupported .npy version ${major}`);
  const headerLen = major === 1 ? buf.readUInt16LE(8) : buf.readUInt32LE(8);
  const offset = major === 1 ? 10 : 12;
  const header = buf.toString('latin1', offset, offset + headerLen);
  const descr = /'descr':\s*'([^']*)'/.exec(header)?.[1];
  const fortran = /'fortran_order':\s*(True|False)/.exec(header)?.[1];
  const shape = /'shape':\s*\(([\d,\s]*)\)/.exec(header)?.[1];
  if (descr === undefined || fortran === undefined || shape === undefined) bad('bad .npy header');
  if (!(descr in DTYPES)) bad(`dtype ${descr} is not supported (only ${Object.keys(DTYPES)})`);
  if (fortran !== 'False') bad('Fortran-order arrays are not supported');
  const dims = shape.split(',').filter((s) => s.trim() !== '').map(Number);
  const count = dims.reduce((a, b) => a * b, 1);
  const body = buf.subarray(offset + headerLen);
  if (body.length !== count * DTYPES[descr]) bad(`expected ${count} values of ${descr}`);
  // Wider integers are read one by one: a zip entry's bytes need not be aligned for a typed array.
  const read = descr === '<i4' ? (i) => body.readInt32LE(4 * i) : (i) => body.readBigInt64LE(8 * i);
  const values = descr === '|u1' ? body : Array.from({ length: count }, (_, i) => Number(read(i)));
  return { descr, shape: dims, values };
}

function readSample(file, numClasses) {
  const buf = readFile(file, 'data file');
  let entries, images, labels;
  try {
    entries = readZip(buf, file);
    for (const key of ['images.npy', 'labels.npy']) {
      if (!(key in entries)) refuse(`${file} has no ${key}`);
    }
    images = readNpy(entries['images.npy'], `${file}:images.npy`);
    labels = readNpy(entries['labels.npy'], `${file}:labels.npy`);
  } catch (err) {
    // A truncated file shows up as a RangeError, a corrupt stream as a zlib error.
    if (err instanceof Refusal) throw err;
    refuse(`${file} is not a readable .npz: ${err.message}`);
  }
  const n = images.shape[0];
  if (images.descr !== '|u1' || JSON.stringify(images.shape) !== JSON.stringify([n, H, W, C])) {
    refuse(`${file}: images must be uint8 [N,32,32,3], got ${images.descr} [${images.shape}]`);
  }
  if (labels.shape.length !== 1 || labels.shape[0] !== n) {
    refuse(`${file}: labels must have shape [${n}], got [${labels.shape}]`);
  }
  if (labels.values.some((y) => !(y >= 0 && y < numClasses))) {
    refuse(`${file}: labels must lie in 0..${numClasses - 1}`);
  }
  return { n, images: images.values, labels: Array.from(labels.values) };
}

// --- model ------------------------------------------------------------------------------------

// uint8 HWC RGB -> float32 NCHW, x / 255: what the manifest's preprocessing section says.
// The division runs in float64, then rounds to float32: the same value as numpy's float32 division.
function toModelInput(images, start, count) {
  const out = new Float32Array(count * C * H * W);
  for (let n = 0; n < count; n++) {
    const src = (start + n) * H * W * C;
    for (let c = 0; c < C; c++) {
      for (let hw = 0; hw < H * W; hw++) {
        out[(n * C + c) * H * W + hw] = images[src + hw * C + c] / 255;
      }
    }
  }
  return out;
}

function argmax(row) {
  let best = 0;
  for (let i = 1; i < row.length; i++) if (row[i] > row[best]) best = i;
  return best;
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const manifest = readManifest(args.dir);
  const modelFile = path.join(args.dir, manifest.file);
  const modelBytes = readFile(modelFile, 'model');
  const digest = crypto.createHash('sha256').update(modelBytes).digest('hex');
  if (digest !== manifest.sha256) {
    refuse(`${modelFile}: sha256 ${digest} does not match the manifest's ${manifest.sha256}`);
  }
  const sample = readSample(args.data, manifest.classNames.length);

  let ort;
  try {
    ort = require('onnxruntime-node');
  } catch {
    refuse('onnxruntime-node is missing: run (cd examples/node && npm ci --ignore-scripts)');
  }
  // Load the bytes that were hashed, so the file cannot change between the check and the load.
  const session = await ort.InferenceSession.create(modelBytes);
  const classes = [];
  const logits = [];
  for (let start = 0; start < sample.n; start += BATCH) {
    const count = Math.min(BATCH, sample.n - start);
    const data = toModelInput(sample.images, start, count);
    const x = new ort.Tensor('float32', data, [count, C, H, W]);
    const y = (await session.run({ [manifest.input]: x }))[manifest.output];
    const k = manifest.classNames.length;
    if (JSON.stringify(y.dims) !== JSON.stringify([count, k])) {
      throw new Error(`model output has shape [${y.dims}], expected [${count},${k}]`);
    }
    for (let i = 0; i < count; i++) {
      const row = Array.from(y.data.subarray(i * k, (i + 1) * k));
      logits.push(row);
      classes.push(argmax(row));
    }
  }
  const correct = classes.filter((cls, i) => cls === sample.labels[i]).length;
  const accuracy = correct / sample.n;
  const version = ort.env.versions.node;
  if (args.json) {
    const { precision } = manifest;
    const result = { images: sample.n, accuracy, classes, logits, precision };
    result.onnxruntime_node = version;
    process.stdout.write(`${JSON.stringify(result)}\n`);
  } else {
    const pct = (100 * accuracy).toFixed(2);
    const via = `${manifest.file}, ${manifest.precision}, via onnxruntime-node ${version}`;
    console.log(`accuracy ${pct}% on ${sample.n} images (${via})`);
  }
}

// One line on stderr, never a stack trace: 2 for a refusal, 1 for anything else.
main().catch((err) => {
  const message = String(err?.message ?? err).split('\n')[0];
  process.stderr.write(`classify.js: ${message}\n`);
  process.exitCode = err instanceof Refusal ? 2 : 1;
});
