// Independent check of a SOPS + age file written by the agent (used by agent/tests/sops_*.rs).
//
//   node verify.mjs FILE IDENTITY_FILE      (env SOPS_NODE_MODULES: the node_modules with sops-age)
//
// 1. Decrypts the file with the npm package sops-age (a separate SOPS implementation).
// 2. Verifies the MAC the way the SOPS format defines it, with nothing but node's crypto, age-encryption (for
//    the data key) and a YAML parser: SHA-512 over every non-null leaf value of the document (the `sops` key
//    excepted) in document order — encrypted ones after decrypting them with AES-256-GCM and the key path
//    ("data:password:") as AAD —, upper-case hex, compared with `sops.mac` decrypted with `sops.lastmodified`
//    as AAD. (sops-age itself does not check the MAC.)
// Prints one JSON object: {decrypted, macOk, macFile, macComputed, encryptedPaths}.
import { createDecipheriv, createHash } from "node:crypto";
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const modules = process.env.SOPS_NODE_MODULES;
if (!modules) throw new Error("SOPS_NODE_MODULES is not set");
const load = (p) => import(pathToFileURL(join(modules, p)).href);
const { decryptSops } = await load("sops-age/dist/index.js");
const age = await load("age-encryption/dist/index.js");
const YAML = createRequire(join(modules, "x.js"))("yaml");

const [file, identityFile] = process.argv.slice(2);
const text = readFileSync(file, "utf8");
const identity = readFileSync(identityFile, "utf8")
  .split("\n")
  .map((l) => l.trim())
  .find((l) => l.startsWith("AGE-SECRET-KEY-"));

const decrypted = await decryptSops(text, { secretKey: identity, fileType: "yaml" });

// --- independent MAC check ---
const doc = YAML.parseDocument(text);
const sops = doc.toJS().sops;
const decrypter = new age.Decrypter();
decrypter.addIdentity(identity);
let dataKey = null;
for (const entry of sops.age) {
  try {
    dataKey = await decrypter.decrypt(age.armor.decode(entry.enc), "uint8array");
    break;
  } catch (_) {
    // not our recipient
  }
}
if (!dataKey || dataKey.length !== 32) throw new Error("no age entry opens with this identity");

const ENC = /^ENC\[AES256_GCM,data:(.*),iv:(.*),tag:(.*),type:(.*)\]$/;
function decryptValue(value, aad) {
  const m = ENC.exec(value);
  const decipher = createDecipheriv("aes-256-gcm", dataKey, Buffer.from(m[2], "base64"));
  decipher.setAAD(Buffer.from(aad, "utf8"));
  decipher.setAuthTag(Buffer.from(m[3], "base64"));
  return Buffer.concat([decipher.update(Buffer.from(m[1], "base64")), decipher.final()]);
}

const hash = createHash("sha512");
const encryptedPaths = [];
function leaf(node, path) {
  const v = node.value;
  if (v === null || v === undefined) return;
  if (typeof v === "string" && ENC.test(v)) {
    const aad = path.join(":") + ":";
    encryptedPaths.push(aad);
    hash.update(decryptValue(v, aad));
  } else if (typeof v === "string") {
    hash.update(Buffer.from(v, "utf8"));
  } else if (typeof v === "boolean") {
    hash.update(v ? "True" : "False");
  } else if (typeof v === "number") {
    hash.update(String(v));
  } else {
    throw new Error(`unexpected scalar at ${path.join(":")}`);
  }
}
function walk(node, path) {
  if (YAML.isMap(node)) {
    for (const pair of node.items) {
      const key = String(YAML.isScalar(pair.key) ? pair.key.value : pair.key);
      if (path.length === 0 && key === "sops") continue;
      walk(pair.value, [...path, key]);
    }
  } else if (YAML.isSeq(node)) {
    for (const item of node.items) walk(item, path);
  } else if (YAML.isScalar(node)) {
    leaf(node, path);
  }
}
walk(doc.contents, []);
const macComputed = hash.digest("hex").toUpperCase();
const macFile = decryptValue(sops.mac, sops.lastmodified).toString("utf8");

process.stdout.write(
  JSON.stringify({
    decrypted,
    macOk: macComputed === macFile,
    macFile,
    macComputed,
    encryptedPaths,
  }) + "\n",
);
