// Child process of the qcow2 crash test: opens an image and runs a deterministic stream of writes,
// write-zeroes, discards and flushes until it is killed. Before each request it prints "S <i>", and
// after each completed flush "F <i>", so the parent knows what was acknowledged before the last
// completed flush and which requests may have been in progress.
import { writeSync } from "node:fs";
import { open, ops, applyToImage } from "./qcow2.ts";

const [path, seedArg, sizeArg, csArg] = process.argv.slice(2);
const disk = open(path!);
let i = 0;
for (const op of ops(Number(seedArg), Number(sizeArg), Number(csArg), { write: 70, read: 0, discard: 5, zeroes: 10, flush: 15 })) {
  writeSync(1, `S ${i}\n`);
  applyToImage(disk, op);
  if (op.op === "flush") writeSync(1, `F ${i}\n`);
  i++;
}
