// The page's logic: load the artifact served beside it, classify the packaged sample images or
// the user's files, and train with the training graph along the served plan, drawing the loss.
// Results land in window.lossxResults (read back by drive.js, the headless test's driver).
// Query parameters: ?steps=N trains the plan's first N steps only.
'use strict';

const { npzBytes, readNpz } = lossxNpz;
const BATCH = 100;
const results = { ready: false, error: null };
window.lossxResults = results;
const $ = (id) => document.getElementById(id);
const state = {};

ort.env.wasm.wasmPaths = '/ort/';
// Threads need cross-origin isolation (serve.js sends the headers).
ort.env.wasm.numThreads = self.crossOriginIsolated ? Math.min(navigator.hardwareConcurrency, 4) : 1;

async function fetchBytes(url) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
  return new Uint8Array(await response.arrayBuffer());
}

async function inflateRaw(bytes) {
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream('deflate-raw'));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

// An artifact file, checked against the manifest's sha256 before ONNX Runtime sees it.
async function artifactFile(name, sha256) {
  const bytes = await fetchBytes(`/artifact/${name}`);
  const digest = new Uint8Array(await crypto.subtle.digest('SHA-256', bytes));
  const hex = Array.from(digest, (b) => b.toString(16).padStart(2, '0')).join('');
  if (hex !== sha256) throw new Error(`${name}: sha256 ${hex} does not match the manifest's`);
  return bytes;
}

function status(text, isError = false) {
  $('status').textContent = text;
  $('status').className = isError ? 'error' : '';
}

function fact(name, value) {
  const row = $('facts').insertRow();
  row.insertCell().textContent = name;
  row.insertCell().textContent = value;
}

async function init() {
  const text = new TextDecoder().decode(await fetchBytes('/artifact/manifest.json'));
  const manifest = lossx.parseManifest(text, 'manifest.json');
  const model = lossx.modelGraph(manifest, 'manifest.json');
  state.manifest = manifest;
  state.model = model;
  state.session = await ort.InferenceSession.create(
    await artifactFile(model.file, model.sha256), { executionProviders: ['wasm'] });
  const sample = await readNpz(await fetchBytes('/sample.npz'), 'sample.npz', inflateRaw);
  const { C, H, W } = manifest.contract;
  if (JSON.stringify(sample.images.shape.slice(1)) !== JSON.stringify([H, W, C])) {
    throw new Error(`sample.npz holds images [${sample.images.shape}], not the artifact's ` +
      `[N,${H},${W},${C}]: start serve.js with --sample NPZ`);
  }
  state.sample = { images: sample.images.typed, labels: Array.from(sample.labels.typed, Number) };
  fact('model', `${manifest.model} (${model.file})`);
  fact('images', `${C === 1 ? 'greyscale' : C === 3 ? 'RGB' : `${C}-channel`} ${H}x${W}, ` +
    `${manifest.contract.classNames.length} classes, mean ${manifest.contract.mean}, ` +
    `std ${manifest.contract.std}`);
  fact('precision', model.precision);
  fact('onnxruntime-web', `${ort.env.versions.web}, WASM, ${ort.env.wasm.numThreads} threads`);
  fact('sample', `${state.sample.labels.length} labelled images`);
  Object.assign(results, {
    precision: model.precision, model: manifest.model,
    onnxruntime_web: ort.env.versions.web, threads: ort.env.wasm.numThreads,
  });
  $('classify').disabled = false;
  $('files').disabled = false;
  await initTraining(manifest);
  results.ready = true;
  status('ready');
}

async function initTraining(manifest) {
  const response = await fetch('/plan.npz');
  if (!response.ok) {
    $('train-info').textContent = 'No training plan: start serve.js with --plan PLAN.npz ' +
      '(lossx train --write-plan writes one).';
    return;
  }
  const bytes = new Uint8Array(await response.arrayBuffer());
  const arrays = await readNpz(bytes, 'plan.npz', inflateRaw);
  const plan = lossx.readPlan(arrays, 'plan.npz', manifest.contract);
  try {
    state.graph = lossx.trainingGraph(manifest, plan.header.loss, 'manifest.json');
    state.update = lossx.optimizerGraph(manifest, plan.header.optimizer, state.graph, 'manifest.json');
  } catch (err) {
    if (!(err instanceof lossxNpz.Refusal)) throw err;
    $('train-info').textContent = `${err.message} (int8 and fp16 artifacts have none).`;
    return;
  }
  state.plan = plan;
  const wanted = Number(new URLSearchParams(location.search).get('steps')) || plan.steps.length;
  state.steps = plan.steps.slice(0, wanted);
  fact('training plan', `${plan.steps.length} steps of ${plan.steps[0].labels.length} images, ` +
    `loss ${plan.header.loss.name}, optimizer ${plan.header.optimizer}, from lossx train --write-plan`);
  $('train').textContent = `Train ${state.steps.length} steps`;
  $('train').disabled = false;
}

async function logitsOf(images, count) {
  const { contract } = state.model;
  const { C, H, W } = contract;
  const x = new ort.Tensor('float32', lossx.toModelInput(images, 0, count, contract), [count, C, H, W]);
  const y = (await state.session.run({ [state.model.input]: x }))[state.model.output];
  const k = state.model.classNames.length;
  const rows = Array.from({ length: count }, (_, i) => Array.from(y.data.subarray(i * k, (i + 1) * k)));
  rows.forEach((row, i) => lossx.checkFinite(row, state.model.file, `the logits of image ${i}`));
  return rows;
}

async function classifySample() {
  $('classify').disabled = true;
  const { images, labels } = state.sample;
  const { C, H, W } = state.model.contract;
  const started = performance.now();
  const logits = [];
  for (let start = 0; start < labels.length; start += BATCH) {
    const count = Math.min(BATCH, labels.length - start);
    const batch = images.subarray(start * H * W * C, (start + count) * H * W * C);
    logits.push(...(await logitsOf(batch, count)));
    status(`classified ${start + count} of ${labels.length} images`);
  }
  const seconds = (performance.now() - started) / 1000;
  const classes = logits.map(lossx.argmax);
  const accuracy = classes.filter((cls, i) => cls === labels[i]).length / labels.length;
  $('accuracy').textContent = `top-1 accuracy ${(100 * accuracy).toFixed(2)}% on ` +
    `${labels.length} images (${state.model.precision}), ` +
    `${(labels.length / seconds).toFixed(0)} images/s`;
  showGrid(images, classes, labels);
  results.classify = { images: labels.length, accuracy, classes, logits, seconds };
  status('classified the sample');
  $('classify').disabled = false;
}

function imageCanvas(pixels) {
  const { C, H, W } = state.model.contract;
  const canvas = document.createElement('canvas');
  [canvas.width, canvas.height] = [W, H];
  const rgba = new ImageData(W, H);
  for (let i = 0; i < H * W; i++) {
    const [r, g, b] = C >= 3 ? pixels.subarray(C * i, C * i + 3) : [0, 0, 0].fill(pixels[C * i]);
    rgba.data.set([r, g, b, 255], 4 * i);
  }
  canvas.getContext('2d').putImageData(rgba, 0, 0);
  return canvas;
}

function figure(canvas, caption, wrong) {
  const fig = document.createElement('figure');
  const text = document.createElement('figcaption');
  text.textContent = caption;
  if (wrong) text.className = 'wrong';
  fig.append(canvas, text);
  return fig;
}

function showGrid(images, classes, labels) {
  const names = state.model.classNames;
  const { C, H, W } = state.model.contract;
  $('grid').replaceChildren(...Array.from({ length: Math.min(24, labels.length) }, (_, i) => figure(
    imageCanvas(images.subarray(i * H * W * C, (i + 1) * H * W * C)),
    names[classes[i]], classes[i] !== labels[i])));
}

// The user's image files, decoded by the browser and fitted to the artifact's size on a canvas by
// its resize policy (the browser's smoothing, not Pillow's bilinear: files of another size may
// give predictions a little different from lossx predict; files of the artifact's size give the
// same pixels), greyscale as Pillow's "L" computes it.
function filePixels(bitmap, contract) {
  const { C, H, W, resize } = contract;
  if (C !== 1 && C !== 3) throw new Error(`image files give 1 or 3 channels; this model takes ${C}`);
  const canvas = document.createElement('canvas');
  [canvas.width, canvas.height] = [W, H];
  const context = canvas.getContext('2d');
  context.imageSmoothingQuality = 'high';
  if (resize === 'crop') {
    const factor = Math.max(W / bitmap.width, H / bitmap.height);
    const [w, h] = [W / factor, H / factor]; // the centre of the file that fills the canvas
    context.drawImage(bitmap, (bitmap.width - w) / 2, (bitmap.height - h) / 2, w, h, 0, 0, W, H);
  } else {
    context.drawImage(bitmap, 0, 0, W, H);
  }
  const rgba = context.getImageData(0, 0, W, H).data;
  const pixels = new Uint8Array(H * W * C);
  for (let i = 0; i < H * W; i++) {
    const [r, g, b] = rgba.subarray(4 * i, 4 * i + 3);
    if (C === 1) pixels[i] = (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16;
    else pixels.set([r, g, b], 3 * i);
  }
  return { canvas, pixels };
}

async function classifyFiles(files) {
  const out = [];
  const found = [];
  for (const file of files) {
    const { canvas, pixels } = filePixels(await createImageBitmap(file), state.model.contract);
    const [row] = await logitsOf(pixels, 1);
    const cls = lossx.argmax(row);
    const probability = 1 / row.reduce((sum, v) => sum + Math.exp(v - row[cls]), 0);
    out.push(figure(canvas, `${state.model.classNames[cls]} ${(100 * probability).toFixed(0)}%`));
    found.push({ file: file.name, class: state.model.classNames[cls], probability, logits: row });
  }
  $('files-out').replaceChildren(...out);
  results.files = found;
}

async function train() {
  $('train').disabled = true;
  const { manifest, graph, update } = state;
  const weightsFile = manifest.weights.file;
  const arrays = await readNpz(
    await artifactFile(weightsFile, lossx.fileHash(manifest, weightsFile, 'manifest.json')),
    weightsFile, inflateRaw);
  const weights = lossx.startingWeights(graph, arrays, weightsFile);
  const session = await ort.InferenceSession.create(
    await artifactFile(graph.file, graph.sha256),
    { executionProviders: ['wasm'], graphOptimizationLevel: 'extended' });
  const optimizer = {
    graph: update,
    session: await ort.InferenceSession.create(
      await artifactFile(update.file, update.sha256), { executionProviders: ['wasm'] }),
  };
  const trainer = new lossx.Trainer(ort, session, graph, weights, state.plan.header, optimizer);
  const losses = [];
  const started = performance.now();
  for (const [index, step] of state.steps.entries()) {
    losses.push(await trainer.step(step));
    drawCurve(losses, state.steps.length);
    status(`step ${index + 1} of ${state.steps.length}: loss ${losses.at(-1).toFixed(4)}`);
  }
  const seconds = (performance.now() - started) / 1000;
  const images = state.steps.reduce((total, s) => total + s.labels.length, 0);
  state.trained = {};
  for (const [name, array] of Object.entries(arrays)) state.trained[name] = weights[name] ?? array;
  results.train = {
    steps: losses.length, images, losses, seconds,
    steps_per_second: losses.length / seconds, images_per_second: images / seconds,
  };
  $('train-info').textContent = `${losses.length} steps in ${seconds.toFixed(1)} s ` +
    `(${(losses.length / seconds).toFixed(2)} steps/s, ${(images / seconds).toFixed(0)} images/s), ` +
    `last loss ${losses.at(-1).toFixed(4)}`;
  $('download').disabled = false;
  status('trained');
}

function drawCurve(losses, total) {
  const canvas = $('curve');
  const g = canvas.getContext('2d');
  const [left, right, top, bottom] = [50, canvas.width - 10, 10, canvas.height - 30];
  const high = Math.max(...losses) * 1.05;
  g.clearRect(0, 0, canvas.width, canvas.height);
  g.strokeStyle = '#999';
  g.strokeRect(left, top, right - left, bottom - top);
  g.fillStyle = '#444';
  g.font = '12px system-ui';
  g.fillText(high.toFixed(2), 4, top + 10);
  g.fillText('0', 36, bottom);
  g.fillText(`step (of ${total})`, (left + right) / 2 - 30, canvas.height - 8);
  g.fillText('loss', 4, (top + bottom) / 2);
  g.strokeStyle = '#1565c0';
  g.lineWidth = 2;
  g.beginPath();
  losses.forEach((loss, i) => {
    const x = left + ((right - left) * (i + 1)) / total;
    const y = bottom - ((bottom - top) * loss) / high;
    if (i === 0) g.moveTo(x, y);
    else g.lineTo(x, y);
  });
  g.stroke();
}

// The trained weights as an .npz (what lossx eval --weights and lossx export --checkpoint read).
function trainedNpz() {
  return npzBytes(state.trained);
}

window.lossxWeightsBase64 = () => {
  const bytes = trainedNpz();
  let text = '';
  for (let i = 0; i < bytes.length; i += 0x8000) {
    text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  }
  return btoa(text);
};

$('classify').onclick = () => classifySample().catch(report);
$('files').onchange = (event) => classifyFiles(event.target.files).catch(report);
$('train').onclick = () => train().catch(report);
$('download').onclick = () => {
  const link = document.createElement('a');
  link.href = URL.createObjectURL(new Blob([trainedNpz()]));
  link.download = 'weights.npz';
  link.click();
};

function report(err) {
  results.error = String(err?.message ?? err);
  status(results.error, true);
}

init().catch(report);
