#!/usr/bin/env node
// Train a lossx artifact's model with its training graph in onnxruntime-node: the graph gives
// the loss, every gradient and the next batch-norm statistics; the artifact's optimizer graph
// (gradient clipping, then SGD or AdamW) updates the weights. The batches and the schedule come
// from a plan that `lossx train --write-plan` writes, so the weights reached equal
// `lossx train --engine onnxruntime`'s with the same recipe.
// Usage: node train.js ARTIFACT_DIR --plan PLAN.npz --out WEIGHTS.npz [--threads N] [--json]
'use strict';

const { readNpz, refuse } = require('./npz');
const {
  optimizerGraph, readPlan, startingWeights, trainingGraph, Trainer,
} = require('./lossx');
const {
  checkOutputNpz, inflateRaw, loadOnnxRuntime, openSession, readChecked, readManifest,
  readNpzFile, runMain, writeNpzFile,
} = require('./files');

function parseArgs(argv) {
  const usage = 'usage: node train.js ARTIFACT_DIR --plan PLAN.npz --out WEIGHTS.npz ' +
    '[--threads N] [--json]';
  const args = { dir: null, plan: null, out: null, threads: 0, json: false };
  for (let i = 0; i < argv.length; i++) {
    const value = () => (i + 1 < argv.length ? argv[++i] : refuse(usage));
    if (argv[i] === '--json') args.json = true;
    else if (argv[i] === '--plan') args.plan = value();
    else if (argv[i] === '--out') args.out = value();
    else if (argv[i] === '--threads') args.threads = Number(value());
    else if (argv[i].startsWith('-') || args.dir !== null) refuse(usage);
    else args.dir = argv[i];
  }
  if (args.dir === null || args.plan === null || args.out === null) refuse(usage);
  if (!Number.isInteger(args.threads) || args.threads < 0) refuse('--threads must be an integer >= 0');
  return args;
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  checkOutputNpz(args.out);
  const { file, manifest } = readManifest(args.dir);
  const { header, steps } = readPlan(readNpzFile(args.plan, 'plan'), args.plan, manifest.contract);
  const graph = trainingGraph(manifest, header.loss, file);
  const update = optimizerGraph(manifest, header.optimizer, graph, file);
  const weightsFile = manifest.weights?.file ?? refuse(`${file}: names no weights file`);
  const weightsBytes = readChecked(args.dir, manifest, weightsFile);
  const arrays = readNpz(weightsBytes, weightsFile, inflateRaw);
  const weights = startingWeights(graph, arrays, weightsFile);

  const ort = loadOnnxRuntime();
  // Level "extended" is "all" without the NCHWc layout transformer, which slows training graphs
  // (lossx's Python runtime turns that transformer off for them too).
  const options = { graphOptimizationLevel: 'extended' };
  if (args.threads) options.intraOpNumThreads = args.threads;
  const session = await openSession(
    ort, readChecked(args.dir, manifest, graph.file), manifest, graph.file, options);
  const optimizer = {
    graph: update,
    session: await openSession(
      ort, readChecked(args.dir, manifest, update.file), manifest, update.file, options),
  };
  const trainer = new Trainer(ort, session, graph, weights, header, optimizer);

  const losses = [];
  const started = process.hrtime.bigint();
  for (const [index, step] of steps.entries()) {
    losses.push(await trainer.step(step));
    if (!args.json) {
      process.stderr.write(`\rstep ${index + 1}/${steps.length}  loss ${losses.at(-1).toFixed(4)}`);
    }
  }
  const seconds = Number(process.hrtime.bigint() - started) / 1e9;
  if (!args.json) process.stderr.write('\n');
  // Every array of the artifact's weights, the trained ones replaced: what lossx eval --weights
  // and lossx export --checkpoint read.
  const out = {};
  for (const [name, array] of Object.entries(arrays)) out[name] = weights[name] ?? array;
  writeNpzFile(args.out, out);

  const images = steps.reduce((total, s) => total + s.labels.length, 0);
  const result = {
    steps: steps.length,
    images,
    losses,
    seconds,
    steps_per_second: steps.length / seconds,
    images_per_second: images / seconds,
    onnxruntime_node: ort.env.versions.node,
    out: args.out,
  };
  if (args.json) process.stdout.write(`${JSON.stringify(result)}\n`);
  else {
    console.log(`wrote ${args.out}: ${steps.length} steps of ${graph.file} and ${update.file}, last loss ` +
      `${losses.at(-1).toFixed(4)}, ${result.images_per_second.toFixed(0)} images/s ` +
      `(onnxruntime-node ${result.onnxruntime_node})`);
  }
}

runMain('train.js', main);
