#!/usr/bin/env node
// Classify labelled images with a lossx artifact, using onnxruntime-node and Node's standard
// library only: no Python, no numpy. Usage: node classify.js ARTIFACT_DIR [--data NPZ] [--json]
// NPZ holds `images` (uint8 [N,H,W,C] at the artifact's size) and `labels`; default: the packaged
// CIFAR-10 sample.
'use strict';

const path = require('node:path');

const { refuse } = require('./npz');
const { argmax, checkFinite, modelGraph, toModelInput } = require('./lossx');
const {
  loadOnnxRuntime, openSession, readChecked, readManifest, readNpzFile, runMain,
} = require('./files');

const DEFAULT_DATA = path.join(__dirname, '../../src/lossx/runtime/data/cifar10_test_subset.npz');
const BATCH = 256;

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

function readSample(file, contract) {
  const { C, H, W } = contract;
  const numClasses = contract.classNames.length;
  const arrays = readNpzFile(file, 'data file');
  for (const key of ['images', 'labels']) {
    if (!(key in arrays)) refuse(`${file} has no ${key}.npy`);
  }
  const { images, labels } = arrays;
  const n = images.shape[0];
  if (images.descr !== '|u1' || JSON.stringify(images.shape) !== JSON.stringify([n, H, W, C])) {
    refuse(`${file}: images must be uint8 [N,${H},${W},${C}] (the artifact's), got ` +
      `${images.descr} [${images.shape}]`);
  }
  if (labels.shape.length !== 1 || labels.shape[0] !== n) {
    refuse(`${file}: labels must have shape [${n}], got [${labels.shape}]`);
  }
  const values = Array.from(labels.typed, Number);
  if (values.some((y) => !(y >= 0 && y < numClasses))) {
    refuse(`${file}: labels must lie in 0..${numClasses - 1}`);
  }
  return { n, images: images.typed, labels: values };
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const { file, manifest } = readManifest(args.dir);
  const graph = modelGraph(manifest, file);
  const modelBytes = readChecked(args.dir, manifest, graph.file);
  const { contract } = graph;
  const { C, H, W } = contract;
  const sample = readSample(args.data, contract);
  const ort = loadOnnxRuntime();
  const session = await openSession(ort, modelBytes, manifest, graph.file);
  const classes = [];
  const logits = [];
  const k = graph.classNames.length;
  for (let start = 0; start < sample.n; start += BATCH) {
    const count = Math.min(BATCH, sample.n - start);
    const pixels = toModelInput(sample.images, start, count, contract);
    const x = new ort.Tensor('float32', pixels, [count, C, H, W]);
    const y = (await session.run({ [graph.input]: x }))[graph.output];
    if (JSON.stringify(y.dims) !== JSON.stringify([count, k])) {
      throw new Error(`model output has shape [${y.dims}], expected [${count},${k}]`);
    }
    for (let i = 0; i < count; i++) {
      const row = Array.from(y.data.subarray(i * k, (i + 1) * k));
      checkFinite(row, graph.file, `the logits of image ${start + i}`);
      logits.push(row);
      classes.push(argmax(row));
    }
  }
  const correct = classes.filter((cls, i) => cls === sample.labels[i]).length;
  const accuracy = correct / sample.n;
  const version = ort.env.versions.node;
  if (args.json) {
    const { precision } = graph;
    const result = { images: sample.n, accuracy, classes, logits, precision };
    result.onnxruntime_node = version;
    process.stdout.write(`${JSON.stringify(result)}\n`);
  } else {
    const pct = (100 * accuracy).toFixed(2);
    const via = `${graph.file}, ${graph.precision}, via onnxruntime-node ${version}`;
    console.log(`accuracy ${pct}% on ${sample.n} images (${via})`);
  }
}

runMain('classify.js', main);
