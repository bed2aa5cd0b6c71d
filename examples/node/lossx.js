// What a JavaScript app needs of a lossx artifact: its manifest's graphs, its image contract (the
// image size, channels, classes and preprocessing), and training with its training graph and
// its optimizer graph (SGD or AdamW, carrying the training graph's next.* buffers and the
// optimizer's state from step to step). Plain JavaScript over typed arrays and an onnxruntime
// module passed in, so it runs in Node (require('./lossx'), onnxruntime-node) and in a browser
// (<script src>, as globalThis.lossx, onnxruntime-web).
'use strict';

(function (root, factory) {
  if (typeof module === 'object' && module.exports) module.exports = factory(require('./npz'));
  else root.lossx = factory(root.lossxNpz);
})(typeof self !== 'undefined' ? self : this, ({ refuse }) => {
  const FORMAT_VERSION = 4;
  const PLAN_FORMAT = 'lossx-training-plan';
  const PLAN_FORMAT_VERSION = 2;

  function parseManifest(text, file) {
    let manifest;
    try {
      manifest = JSON.parse(text);
    } catch (err) {
      refuse(`${file} is not valid JSON: ${err.message}`);
    }
    if (manifest?.format !== 'lossx-artifact' || manifest.format_version !== FORMAT_VERSION) {
      refuse(`${file} is not a lossx artifact manifest of format_version ${FORMAT_VERSION}`);
    }
    checkFiles(manifest, file);
    manifest.contract = imageContract(manifest, file);
    return manifest;
  }

  // The rules lossx's Python loader applies to the files a manifest lists
  // (manifest.schema.json): plain names inside the artifact (no path, no "..": a name is all an
  // app may join to the artifact's folder), a sha256 and a size each, and exactly the graphs'
  // files and the weights file.
  const FILE_NAME = /^[A-Za-z0-9_][A-Za-z0-9_.-]{0,200}$/;

  function checkFiles(manifest, file) {
    const { files, graphs, weights } = manifest;
    if (typeof files !== 'object' || files === null || Array.isArray(files)) {
      refuse(`${file}: no files section`);
    }
    for (const [name, info] of Object.entries(files)) {
      if (!FILE_NAME.test(name)) refuse(`${file}: file name ${JSON.stringify(name)} is not a plain file name`);
      if (!/^[0-9a-f]{64}$/.test(info?.sha256)) refuse(`${file}: no sha256 for ${name}`);
      if (!Number.isSafeInteger(info?.bytes) || info.bytes < 0) refuse(`${file}: no size for ${name}`);
    }
    if (!Array.isArray(graphs)) refuse(`${file}: no graphs section`);
    const expected = new Set([...graphs.map((g) => g?.file), weights?.file]);
    const listed = new Set(Object.keys(files));
    for (const name of new Set([...expected, ...listed])) {
      if (!expected.has(name) || !listed.has(name)) {
        refuse(`${file}: files and graphs disagree about ${JSON.stringify(name)}`);
      }
    }
  }

  // The image contract (lossx.runtime.contract), checked step by step against what this code
  // implements: uint8 HWC pixels divided by 255, then (x - mean) / std per channel, as float32
  // NCHW. Anything else is refused, not guessed. { C, H, W, mean, std, resize, classNames }.
  function imageContract(manifest, file) {
    const pre = manifest.preprocessing;
    if (typeof pre !== 'object' || pre === null) refuse(`${file}: no preprocessing section`);
    const input = pre.input ?? {};
    const { channels: C, height: H, width: W } = input;
    const steps = [
      [input.dtype === 'uint8' && input.layout === 'HWC', 'input uint8 HWC'],
      [[C, H, W].every((v) => Number.isSafeInteger(v) && v > 0), 'channels, height and width'],
      [pre.scale === 255, 'scale 255'],
      [pre.output?.dtype === 'float32' && pre.output?.layout === 'NCHW', 'output float32 NCHW'],
      [[pre.mean, pre.std].every((v) => Array.isArray(v) && v.length === C &&
        v.every(Number.isFinite)), 'a mean and a std per channel'],
      [pre.std?.every?.((v) => v > 0), 'positive std'],
      [['stretch', 'crop'].includes(pre.resize), 'resize stretch or crop'],
    ];
    for (const [ok, what] of steps) {
      if (!ok) refuse(`${file}: preprocessing is not ${what}; this example implements that only`);
    }
    const classNames = manifest.class_names;
    if (!Array.isArray(classNames) || classNames.length === 0) refuse(`${file}: no class_names`);
    const f = Math.fround;
    return { C, H, W, mean: pre.mean.map(f), std: pre.std.map(f), resize: pre.resize, classNames };
  }

  function fileHash(manifest, name, file) {
    const sha256 = manifest.files?.[name]?.sha256;
    if (!/^[0-9a-f]{64}$/.test(sha256)) refuse(`${file}: no sha256 for ${name}`);
    return sha256;
  }

  // The model graph: { file, sha256, input, output, classNames, precision, contract }.
  function modelGraph(manifest, file) {
    const graph = (manifest.graphs || []).find((g) => g.kind === 'model');
    const [input, output] = [graph?.inputs?.[0], graph?.outputs?.[0]];
    if (graph?.inputs?.length !== 1 || graph.outputs?.length !== 1) {
      refuse(`${file}: expected one model graph with one input and one output`);
    }
    const { contract } = manifest;
    const chw = [contract.C, contract.H, contract.W];
    if (input.dtype !== 'float32' || JSON.stringify(input.shape?.slice(1)) !== JSON.stringify(chw)) {
      refuse(`${file}: model input ${JSON.stringify(input)} is not float32 [N,${chw}]`);
    }
    const { classNames } = contract;
    if (!Array.isArray(classNames) || output.shape?.[1] !== classNames.length) {
      refuse(`${file}: model output shape ${JSON.stringify(output.shape)} does not fit class_names`);
    }
    const precision = manifest.precision?.name ?? 'fp32'; // fp32, int8 or fp16: same inputs
    const sha256 = fileHash(manifest, graph.file, file);
    return {
      file: graph.file, sha256, input: input.name, output: output.name, classNames, precision, contract,
    };
  }

  // The training graph for `loss` ({ name, options } as the manifest writes it): its file, and
  // its tensors by role (the contract of docs/artifact.md).
  function trainingGraph(manifest, loss, file) {
    const graphs = (manifest.graphs || []).filter((g) => g.kind === 'train');
    const graph = graphs.find((g) => g.loss?.name === loss.name);
    if (!graph) {
      const have = graphs.map((g) => g.loss?.name).join(', ') || 'none';
      refuse(`${file}: no training graph for loss ${loss.name} (has: ${have}); export with --train`);
    }
    if (JSON.stringify(sorted(graph.loss)) !== JSON.stringify(sorted(loss))) {
      refuse(`${file}: its ${loss.name} training graph computes ${JSON.stringify(graph.loss)}, ` +
        `the plan ${JSON.stringify(loss)}`);
    }
    const byRole = (tensors, role) => tensors.filter((t) => t.role === role);
    const [images] = byRole(graph.inputs, 'images');
    const [target] = byRole(graph.inputs, 'target');
    const gradients = Object.fromEntries(
      byRole(graph.outputs, 'gradient').map((t) => [t.gradient_of, t.name]));
    const nextBuffers = Object.fromEntries(
      byRole(graph.outputs, 'next_buffer').map((t) => [t.name.replace(/^next\./, ''), t.name]));
    const parameters = byRole(graph.inputs, 'parameter');
    for (const p of parameters) {
      if (!(p.name in gradients)) refuse(`${file}: ${graph.file} has no gradient of ${p.name}`);
    }
    return {
      file: graph.file,
      sha256: fileHash(manifest, graph.file, file),
      contract: manifest.contract,
      classes: manifest.class_names.length,
      images: images.name,
      target,
      parameters, // the trainable ones: each has a gradient
      frozen: byRole(graph.inputs, 'frozen_parameter'), // fed as they are, never updated
      buffers: byRole(graph.inputs, 'buffer'),
      gradients,
      nextBuffers,
    };
  }

  const sorted = (value) => (value && typeof value === 'object' && !Array.isArray(value)
    ? Object.fromEntries(Object.keys(value).sort().map((k) => [k, sorted(value[k])]))
    : value);

  // The weights a training graph starts from (an .npz's arrays by state_dict name), checked
  // against its inputs' shapes and dtypes and copied: { name: { typed, shape } }.
  function startingWeights(graph, arrays, file) {
    const weights = {};
    for (const t of [...graph.parameters, ...graph.frozen, ...graph.buffers]) {
      const array = arrays[t.name];
      if (!array) refuse(`${file} has no ${t.name}`);
      const descr = t.dtype === 'int64' ? '<i8' : '<f4';
      if (array.descr !== descr || JSON.stringify(array.shape) !== JSON.stringify(t.shape)) {
        refuse(`${file}: ${t.name} is ${array.descr} [${array.shape}], expected ${t.dtype} ` +
          `[${t.shape}]`);
      }
      weights[t.name] = { typed: array.typed.slice(), shape: t.shape };
    }
    return weights;
  }

  // A plan written by `lossx train --write-plan` (its .npz arrays) for images of `contract`:
  // { header, steps }, each step { pixels (uint8 [B,C,H,W]), labels (BigInt64Array), lr, momentum }.
  function readPlan(arrays, file, contract) {
    const { C, H, W } = contract;
    for (const key of ['plan', 'images', 'labels', 'batch_sizes', 'lr', 'momentum']) {
      if (!(key in arrays)) refuse(`${file} is not a lossx training plan: no ${key}`);
    }
    let header;
    try {
      header = JSON.parse(new TextDecoder().decode(arrays.plan.typed));
    } catch (err) {
      refuse(`${file}: its plan header is not JSON (${err.message})`);
    }
    if (header?.format !== PLAN_FORMAT || header.format_version !== PLAN_FORMAT_VERSION) {
      refuse(`${file} is not a lossx training plan of format_version ${PLAN_FORMAT_VERSION}`);
    }
    if (!/^[a-z0-9]+$/.test(header.optimizer ?? '')) refuse(`${file}: names no optimizer`);
    const { images, labels } = arrays;
    const total = labels.typed.length;
    if (images.descr !== '|u1' || JSON.stringify(images.shape) !== JSON.stringify([total, C, H, W])) {
      refuse(`${file}: images must be uint8 [${total},${C},${H},${W}] (the artifact's), got ` +
        `${images.descr} [${images.shape}]`);
    }
    const sizes = Array.from(arrays.batch_sizes.typed, Number);
    if (sizes.reduce((a, b) => a + b, 0) !== total || sizes.length !== arrays.lr.typed.length) {
      refuse(`${file}: batch_sizes, lr and labels disagree`);
    }
    const steps = [];
    let start = 0;
    sizes.forEach((size, s) => {
      steps.push({
        pixels: images.typed.subarray(start * C * H * W, (start + size) * C * H * W),
        labels: labels.typed.subarray(start, start + size),
        lr: arrays.lr.typed[s],
        momentum: arrays.momentum.typed[s],
      });
      start += size;
    });
    return { header, steps };
  }

  // One pixel as the model takes it: x / 255, then (x - mean) / std, each rounded to float32 as
  // numpy's float32 arithmetic rounds it. Each operation runs in float64 and rounds to float32:
  // the same value as the float32 operation (53 >= 2*24 + 2 bits, so rounding twice is exact).
  function pixelValue(x, mean, std) {
    const f = Math.fround;
    const scaled = f(x / 255);
    return mean === 0 && std === 1 ? scaled : f(f(scaled - mean) / std);
  }

  // uint8 HWC images [N,H,W,C] -> the model's float32 NCHW, preprocessed as `contract` says.
  function toModelInput(images, start, count, contract) {
    const { C, H, W, mean, std } = contract;
    const out = new Float32Array(count * C * H * W);
    for (let n = 0; n < count; n++) {
      const src = (start + n) * H * W * C;
      for (let c = 0; c < C; c++) {
        for (let hw = 0; hw < H * W; hw++) {
          out[(n * C + c) * H * W + hw] = pixelValue(images[src + hw * C + c], mean[c], std[c]);
        }
      }
    }
    return out;
  }

  // uint8 CHW pixels (a plan's) -> float32, preprocessed as `contract` says. A plain loop:
  // Float32Array.from with a mapping function took 30 ms a batch of 64 in Node 20, a quarter of
  // a training step.
  function scale(pixels, contract) {
    const { C, H, W, mean, std } = contract;
    const out = new Float32Array(pixels.length);
    for (let i = 0; i < pixels.length; i++) {
      const c = Math.floor(i / (H * W)) % C;
      out[i] = pixelValue(pixels[i], mean[c], std[c]);
    }
    return out;
  }

  // Refuses NaN or Inf in a graph's logits: a class or an accuracy computed from them would mean
  // nothing (as lossx's Python runtime refuses them).
  function checkFinite(values, file, what) {
    const bad = values.find((v) => !Number.isFinite(v));
    if (bad !== undefined) {
      refuse(`${file} computes ${bad} in ${what}, not a number: the model or its weights are broken`);
    }
  }

  function argmax(row) {
    let best = 0;
    for (let i = 1; i < row.length; i++) if (row[i] > row[best]) best = i;
    return best;
  }

  // The target input for class labels, in the form the graph's target takes (as lossx's
  // runtime.feeds.target_form): the labels, their one-hot vectors, or those vectors' logs.
  function targetTensor(ort, graph, labels) {
    const { target, classes } = graph;
    if (target.values === 'class_index') return new ort.Tensor('int64', labels, [labels.length]);
    const fill = target.values === 'log_probabilities'
      ? [Math.fround(Math.log(1.1754943508222875e-38)), 0] // log(float32 tiny), log(1)
      : [0, 1];
    const data = new Float32Array(labels.length * classes).fill(fill[0]);
    labels.forEach((y, i) => {
      data[i * classes + Number(y)] = fill[1];
    });
    return new ort.Tensor('float32', data, [labels.length, classes]);
  }

  // The artifact's graph of update rule `rule` (docs/training.md, "Optimizer graphs") for the
  // parameters training graph `train` trains: its file, hyperparameters, each parameter's
  // gradient input and its state (zeros before the first step).
  function optimizerGraph(manifest, rule, train, file) {
    const name = `optimizer_${rule}.onnx`;
    const graph = (manifest.graphs || []).find((g) => g.kind === 'optimizer' && g.file === name);
    if (!graph) refuse(`${file}: no ${name}; export the artifact with --train again`);
    const byRole = (role) => graph.inputs.filter((t) => t.role === role);
    const updated = byRole('parameter').map((t) => t.name).join();
    if (updated !== train.parameters.map((t) => t.name).join()) {
      refuse(`${file}: ${name} updates other parameters than ${train.file} trains`);
    }
    return {
      file: name,
      sha256: fileHash(manifest, name, file),
      hyperparameters: byRole('hyperparameter'),
      gradients: Object.fromEntries(byRole('gradient').map((t) => [t.gradient_of, t.name])),
      states: byRole('optimizer_state'),
    };
  }

  const SCALARS = {
    float64: (ort, v) => new ort.Tensor('float64', Float64Array.of(v), []),
    int64: (ort, v) => new ort.Tensor('int64', BigInt64Array.of(BigInt(v)), []),
    bool: (ort, v) => new ort.Tensor('bool', Uint8Array.of(v ? 1 : 0), []),
  };

  // Trains with a training graph's session and an optimizer graph's (`optimizer`: { session,
  // graph } from optimizerGraph): weights ({ name: { typed, shape } }, updated in place) step
  // by step through a plan's steps. Each step runs the training graph (loss, gradients, next
  // batch-norm statistics), then the update graph on the gradients, as lossx train --engine
  // onnxruntime does.
  class Trainer {
    constructor(ort, session, graph, weights, header, optimizer) {
      Object.assign(this, { ort, session, graph, weights, optimizer });
      this.settings = {
        weight_decay: header.weight_decay, clip_norm: header.clip_norm, ...header.hyperparameters,
      };
      this.state = Object.fromEntries(optimizer.graph.states.map(
        (t) => [t.name, new Float32Array(t.shape.reduce((a, b) => a * b, 1))]));
      this.steps = 0;
    }

    async step({ pixels, labels, lr, momentum }) {
      const { ort, graph, weights } = this;
      const tensor = (t) => new ort.Tensor(t.dtype, weights[t.name].typed, weights[t.name].shape);
      const { C, H, W } = graph.contract;
      const feeds = {
        [graph.images]: new ort.Tensor('float32', scale(pixels, graph.contract), [labels.length, C, H, W]),
        [graph.target.name]: targetTensor(ort, graph, labels),
      };
      for (const t of [...graph.parameters, ...graph.frozen, ...graph.buffers]) feeds[t.name] = tensor(t);
      const out = await this.session.run(feeds);
      for (const [buffer, name] of Object.entries(graph.nextBuffers)) {
        weights[buffer].typed = out[name].data.slice();
      }
      this.steps += 1;
      const update = this.optimizer.graph;
      // the schedule's momentum is SGD's momentum and AdamW's beta1
      const values = { ...this.settings, lr, momentum, beta1: momentum, step: this.steps };
      const inputs = {};
      for (const h of update.hyperparameters) {
        if (!(h.name in values)) refuse(`the plan sets no ${h.name} for ${update.file}`);
        inputs[h.name] = SCALARS[h.dtype](ort, values[h.name]);
      }
      for (const t of graph.parameters) {
        inputs[t.name] = tensor(t);
        inputs[update.gradients[t.name]] = out[graph.gradients[t.name]];
      }
      for (const t of update.states) inputs[t.name] = new ort.Tensor('float32', this.state[t.name], t.shape);
      const next = await this.optimizer.session.run(inputs);
      for (const t of graph.parameters) weights[t.name].typed = next[`next.${t.name}`].data;
      for (const t of update.states) this.state[t.name] = next[`next.${t.name}`].data;
      return out.loss.data[0];
    }
  }

  return {
    argmax,
    checkFinite,
    fileHash,
    modelGraph,
    optimizerGraph,
    parseManifest,
    readPlan,
    startingWeights,
    toModelInput,
    trainingGraph,
    Trainer,
  };
});
