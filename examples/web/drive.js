#!/usr/bin/env node
// Drives the page headless in Debian's Chromium with playwright-core (no browser download):
// classifies the sample, trains (where the page has a plan), and writes what the page reports to
// OUT_DIR: results.json, weights.npz (the trained weights) and screenshot.png.
// With --files, it also picks those image files in the page's file chooser.
// Usage: node drive.js URL OUT_DIR [--steps N] [--files A.png,B.jpg] [--chromium PATH]
//        [--timeout SECONDS]
'use strict';

const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');

const FLAGS = ['--no-sandbox', '--disable-gpu', '--disable-background-networking',
  '--disable-component-update', '--disable-sync', '--no-first-run'];

function parseArgs(argv) {
  const usage = 'usage: node drive.js URL OUT_DIR [--steps N] [--files A.png,B.jpg] ' +
    '[--chromium PATH] [--timeout S]';
  const args = { url: null, out: null, steps: null, files: [], chromium: '/usr/bin/chromium',
    timeout: 300 };
  const positional = [];
  for (let i = 0; i < argv.length; i++) {
    const value = () => (i + 1 < argv.length ? argv[++i] : fail(usage));
    if (argv[i] === '--steps') args.steps = Number(value());
    else if (argv[i] === '--files') args.files = value().split(',');
    else if (argv[i] === '--chromium') args.chromium = value();
    else if (argv[i] === '--timeout') args.timeout = Number(value());
    else if (argv[i].startsWith('-')) fail(usage);
    else positional.push(argv[i]);
  }
  if (positional.length !== 2) fail(usage);
  [args.url, args.out] = positional;
  if (!fs.existsSync(args.chromium)) fail(`no browser at ${args.chromium} (apt-get install chromium)`);
  return args;
}

function fail(message) {
  process.stderr.write(`drive.js: ${message}\n`);
  process.exit(2);
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const { chromium } = require('playwright-core');
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'lossx-chromium-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: args.chromium, headless: true, args: FLAGS,
    viewport: { width: 1000, height: 1100 },
  });
  const logs = [];
  try {
    const page = context.pages()[0] ?? await context.newPage();
    page.on('console', (msg) => logs.push(`${msg.type()}: ${msg.text()}`));
    page.on('pageerror', (err) => logs.push(`pageerror: ${err.message}`));
    const url = new URL(args.url);
    if (args.steps !== null) url.searchParams.set('steps', String(args.steps));
    await page.goto(url.href);
    const timeout = args.timeout * 1000;
    const settled = async (key) => {
      await page.waitForFunction((k) => window.lossxResults?.[k] || window.lossxResults?.error,
        key, { timeout });
      const error = await page.evaluate(() => window.lossxResults.error);
      if (error) throw new Error(`the page reports: ${error}`);
    };
    await settled('ready');
    await page.click('#classify');
    await settled('classify');
    if (args.files.length) {
      await page.setInputFiles('#files', args.files);
      await settled('files');
    }
    if (await page.isEnabled('#train')) {
      await page.click('#train');
      await settled('train');
      const weights = await page.evaluate(() => window.lossxWeightsBase64());
      fs.writeFileSync(path.join(args.out, 'weights.npz'), Buffer.from(weights, 'base64'));
    }
    await page.screenshot({ path: path.join(args.out, 'screenshot.png'), fullPage: true });
    const results = await page.evaluate(() => window.lossxResults);
    results.browser = context.browser()?.version() ?? null;
    results.console = logs;
    fs.writeFileSync(path.join(args.out, 'results.json'), JSON.stringify(results));
    const { classify, train } = results;
    const summary = { precision: results.precision, accuracy: classify.accuracy,
      classify_images_per_second: classify.images / classify.seconds,
      train_steps: train?.steps ?? 0, train_steps_per_second: train?.steps_per_second ?? null };
    process.stdout.write(`${JSON.stringify(summary)}\n`);
  } catch (err) {
    process.stderr.write(`drive.js: ${String(err.message).split('\n')[0]}\n`);
    for (const line of logs.slice(-5)) process.stderr.write(`  page ${line}\n`);
    process.exitCode = 1;
  } finally {
    await context.close();
    fs.rmSync(profile, { recursive: true, force: true });
  }
}

main();
