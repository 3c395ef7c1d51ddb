// Memory hot-plug: ADD_MEM_REG arrives hundreds of times (one per DIMM or virtio-mem block) while
// the guest does I/O. Each added region must be usable by every ring as soon as it is
// acknowledged — in the device thread and in queue threads — without stopping any ring.
import { describe, test, expect, afterEach } from "bun:test";
import { BackendUnderTest, GuestRam, Vmm, DriverQueue, Req, memRegion } from "../support/frontend.ts";

const ECHO = new URL("../support/echo_device.ts", import.meta.url).href;
const REGION = 64 * 1024;
const REGIONS = 120;

let backend: BackendUnderTest | null = null;
let vmm: Vmm | null = null;
let ram: GuestRam | null = null;

afterEach(async () => {
  vmm?.conn.close();
  await backend?.stop();
  ram?.dispose();
  backend = vmm = ram = null;
});

for (const threaded of [true, false]) {
  describe(`ADD_MEM_REG under I/O (${threaded ? "queue threads" : "device thread"})`, () => {
    test(`${REGIONS} regions added one by one; each is usable at once by every ring, and no ring restarts`, async () => {
      const starts = new Int32Array(new SharedArrayBuffer(8)); // [ring starts, requests]
      backend = new BackendUnderTest("echo", { threaded, counters: starts.buffer }, ECHO);
      await backend.ready;
      // One memfd split into regions at matching offsets (as QEMU splits RAM); region 0 holds the rings.
      ram = new GuestRam(REGION * (REGIONS + 1));
      vmm = new Vmm(backend, ram);
      const v = vmm;
      const r = ram;
      v.handshake();
      const add = (k: number) =>
        v.conn.ack(Req.ADD_MEM_REG, memRegion({ gpa: k * REGION, size: REGION, uaddr: r.uaddr + k * REGION, offset: k * REGION }), [r.fd]);
      expect(add(0)).toBe(0n);
      v.queues = [new DriverQueue(r, 0, 64), new DriverQueue(r, 1, 64)];
      for (const q of v.queues) v.startQueue(q);
      await Bun.sleep(50);
      const startsBefore = Atomics.load(starts, 0);
      expect(startsBefore).toBe(2);

      // A request whose buffers both lie in region k (which the backend has only just been given).
      const echoIn = async (q: DriverQueue, k: number, text: string) => {
        const src = k * REGION + REGION / 2;
        const dst = k * REGION + REGION / 2 + 4096;
        r.bytes(src, text.length).set(Buffer.from(text));
        r.bytes(dst, 256).fill(0);
        const head = q.addChain([{ gpa: src, len: text.length }, { gpa: dst, len: 256, write: true }]);
        const [u] = await q.waitUsed(1);
        expect(u!.id).toBe(head);
        return Buffer.from(r.bytes(dst, u!.len)).toString();
      };
      for (let k = 1; k <= REGIONS; k++) {
        // Keep a request in flight on queue 1 while the region arrives.
        const busy = echoIn(v.queues[1]!, k - 1, `busy ${k}`);
        expect(add(k)).toBe(0n);
        expect(await echoIn(v.queues[0]!, k, `region ${k}`)).toBe(`region ${k}`);
        expect(await busy).toBe(`busy ${k}`);
        expect(await echoIn(v.queues[1]!, k, `q1 region ${k}`)).toBe(`q1 region ${k}`);
      }
      expect(Atomics.load(starts, 0)).toBe(startsBefore);
      // Removal still stops the rings around the unmap, and they go on after it.
      expect(v.conn.ack(Req.REM_MEM_REG, memRegion({ gpa: REGIONS * REGION, size: REGION, uaddr: r.uaddr + REGIONS * REGION, offset: REGIONS * REGION }))).toBe(0n);
      expect(await echoIn(v.queues[0]!, 1, "after removal")).toBe("after removal");
    }, 120_000);
  });
}
