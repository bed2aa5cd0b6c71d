// .npz files (zips of .npy arrays) read and written in plain JavaScript, and the one-line
// refusals the examples report bad input with. No Node.js module is used, so the same file runs
// in Node (require('./npz')) and in a browser (<script src>, as globalThis.lossxNpz).
'use strict';

(function (root, factory) {
  if (typeof module === 'object' && module.exports) module.exports = factory();
  else root.lossxNpz = factory();
})(typeof self !== 'undefined' ? self : this, () => {
  // A refusal: bad input that the user can fix. Reported in one line (exit code 2 in Node).
  class Refusal extends Error {}
  const refuse = (message) => {
    throw new Refusal(message);
  };

  const CRC_TABLE = Uint32Array.from({ length: 256 }, (_, n) => {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    return c >>> 0;
  });

  function crc32(bytes) {
    let c = 0xffffffff;
    for (let i = 0; i < bytes.length; i++) c = CRC_TABLE[(c ^ bytes[i]) & 0xff] ^ (c >>> 8);
    return (c ^ 0xffffffff) >>> 0;
  }

  const latin1 = (bytes) => String.fromCharCode(...bytes);

  // Every entry of a zip through its central directory (stored or deflate, no zip64):
  // [{ name, method, raw, size, crc }], `raw` still compressed where method is 8.
  function zipEntries(bytes, file) {
    const bad = (why) => refuse(`${file} is not a readable .npz: ${why}`);
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    const u32 = (at) => (at + 4 <= bytes.length ? view.getUint32(at, true) : bad('truncated'));
    const u16 = (at) => (at + 2 <= bytes.length ? view.getUint16(at, true) : bad('truncated'));
    // The end-of-central-directory record sits in the last 22 + 65535 (comment) bytes.
    let eocd = -1;
    for (let i = bytes.length - 22; i >= Math.max(0, bytes.length - 22 - 0xffff); i--) {
      if (u32(i) === 0x06054b50) {
        eocd = i;
        break;
      }
    }
    if (eocd < 0) bad('no zip end-of-central-directory record');
    const count = u16(eocd + 10);
    let p = u32(eocd + 16);
    if (count === 0xffff || p === 0xffffffff) bad('zip64 archives are not supported');
    const entries = [];
    for (let n = 0; n < count; n++) {
      if (u32(p) !== 0x02014b50) bad('corrupt central directory');
      const [flags, method, crc] = [u16(p + 8), u16(p + 10), u32(p + 16)];
      const [packed, size, nameLen, local] = [u32(p + 20), u32(p + 24), u16(p + 28), u32(p + 42)];
      const name = new TextDecoder().decode(bytes.subarray(p + 46, p + 46 + nameLen));
      p += 46 + nameLen + u16(p + 30) + u16(p + 32);
      if (flags & 1) bad(`${name} is encrypted`);
      if ([packed, size, local].includes(0xffffffff)) bad(`${name} needs zip64`);
      if (u32(local) !== 0x04034b50) bad(`${name}: corrupt local header`);
      // The local header's own name and extra lengths (its zip64 extra may differ) locate it.
      const start = local + 30 + u16(local + 26) + u16(local + 28);
      if (start + packed > bytes.length) bad(`${name} is truncated`);
      if (method !== 0 && method !== 8) {
        bad(`${name} uses compression method ${method} (only stored and deflate)`);
      }
      entries.push({ name, method, raw: bytes.subarray(start, start + packed), size, crc });
    }
    return entries;
  }

  // Parses a .npy file (format 1.0-3.0), C order, of the little-endian dtypes listed here:
  // { descr, shape, typed } with `typed` a fresh (aligned) typed array of the values.
  const TYPED = {
    '|u1': Uint8Array,
    '<i4': Int32Array,
    '<i8': BigInt64Array,
    '<f4': Float32Array,
    '<f8': Float64Array,
  };

  function readNpy(bytes, name) {
    const bad = (why) => refuse(`${name}: ${why}`);
    if (bytes.length < 10 || latin1(bytes.subarray(0, 6)) !== '\x93NUMPY') bad('not a .npy file');
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    const major = bytes[6];
    if (![1, 2, 3].includes(major)) bad(`unsupported .npy version ${major}`);
    const headerLen = major === 1 ? view.getUint16(8, true) : view.getUint32(8, true);
    const offset = major === 1 ? 10 : 12;
    const header = latin1(bytes.subarray(offset, offset + headerLen));
    const descr = /'descr':\s*'([^']*)'/.exec(header)?.[1];
    const fortran = /'fortran_order':\s*(True|False)/.exec(header)?.[1];
    const shape = /'shape':\s*\(([\d,\s]*)\)/.exec(header)?.[1];
    if (descr === undefined || fortran === undefined || shape === undefined) bad('bad .npy header');
    const Typed = TYPED[descr];
    if (!Typed) bad(`dtype ${descr} is not supported (only ${Object.keys(TYPED)})`);
    if (fortran !== 'False') bad('Fortran-order arrays are not supported');
    const dims = shape.split(',').filter((s) => s.trim() !== '').map(Number);
    const count = dims.reduce((a, b) => a * b, 1);
    const body = bytes.subarray(offset + headerLen);
    if (body.length !== count * Typed.BYTES_PER_ELEMENT) bad(`expected ${count} values of ${descr}`);
    // Copied into a fresh buffer: a zip entry's bytes need not be aligned for a typed array.
    return { descr, shape: dims, typed: new Typed(new Uint8Array(body).buffer) };
  }

  // Every array of an .npz's bytes: name (without .npy) -> { descr, shape, typed }.
  // `inflateRaw(bytes, size)` decompresses a deflate entry of `size` bytes as declared; where it
  // returns a Promise (a browser's DecompressionStream), so does readNpz.
  function readNpz(bytes, file, inflateRaw) {
    const entries = zipEntries(bytes, file);
    const build = (datas) => {
      const arrays = {};
      entries.forEach(({ name, size, crc }, i) => {
        const data = datas[i];
        if (data.length !== size) refuse(`${file}: ${name} has ${data.length} bytes, not ${size}`);
        if (crc32(data) !== crc) refuse(`${file}: ${name} fails its CRC-32 check`);
        arrays[name.replace(/\.npy$/, '')] = readNpy(data, `${file}:${name}`);
      });
      return arrays;
    };
    const datas = entries.map((e) => (e.method === 0 ? e.raw : inflateRaw(e.raw, e.size)));
    return datas.some((d) => d instanceof Promise) ? Promise.all(datas).then(build) : build(datas);
  }

  // One .npy file (format 1.0) of a typed array, little-endian.
  function npyBytes(typed, shape) {
    const descr = Object.keys(TYPED).find((key) => typed instanceof TYPED[key]);
    const dims = shape.length === 1 ? `${shape[0]},` : shape.join(', ');
    let header = `{'descr': '${descr}', 'fortran_order': False, 'shape': (${dims}), }`;
    header += ' '.repeat(63 - ((10 + header.length) % 64)) + '\n'; // the data starts 64-aligned
    const out = new Uint8Array(10 + header.length + typed.byteLength);
    out.set([0x93, ...Array.from('NUMPY', (ch) => ch.charCodeAt(0)), 1, 0], 0);
    new DataView(out.buffer).setUint16(8, header.length, true);
    out.set(Array.from(header, (ch) => ch.charCodeAt(0)), 10);
    out.set(new Uint8Array(typed.buffer, typed.byteOffset, typed.byteLength), 10 + header.length);
    return out;
  }

  // The bytes of an uncompressed .npz of arrays ({ name: { typed, shape } }), as numpy.savez.
  function npzBytes(arrays) {
    const parts = [];
    const centrals = [];
    let offset = 0;
    for (const [key, { typed, shape }] of Object.entries(arrays)) {
      const name = new TextEncoder().encode(`${key}.npy`);
      const data = npyBytes(typed, shape);
      const local = new DataView(new ArrayBuffer(30));
      local.setUint32(0, 0x04034b50, true);
      local.setUint16(4, 20, true); // version needed
      local.setUint32(14, crc32(data), true);
      local.setUint32(18, data.length, true);
      local.setUint32(22, data.length, true);
      local.setUint16(26, name.length, true);
      const central = new DataView(new ArrayBuffer(46));
      central.setUint32(0, 0x02014b50, true);
      central.setUint16(4, 20, true);
      central.setUint16(6, 20, true);
      new Uint8Array(central.buffer).set(new Uint8Array(local.buffer, 8, 18), 10); // crc, sizes
      central.setUint16(28, name.length, true);
      central.setUint32(42, offset, true);
      parts.push(new Uint8Array(local.buffer), name, data);
      centrals.push(new Uint8Array(central.buffer), name);
      offset += 30 + name.length + data.length;
    }
    const size = centrals.reduce((total, part) => total + part.length, 0);
    const end = new DataView(new ArrayBuffer(22));
    end.setUint32(0, 0x06054b50, true);
    end.setUint16(8, centrals.length / 2, true);
    end.setUint16(10, centrals.length / 2, true);
    end.setUint32(12, size, true);
    end.setUint32(16, offset, true);
    const all = [...parts, ...centrals, new Uint8Array(end.buffer)];
    const out = new Uint8Array(offset + size + 22);
    let at = 0;
    for (const part of all) {
      out.set(part, at);
      at += part.length;
    }
    return out;
  }

  return { Refusal, refuse, crc32, readNpy, readNpz, npzBytes, zipEntries };
});
