import { test, expect } from "bun:test";
import { libc, check, close } from "../../ffi/libc.ts";
import { read, write } from "../../ffi/io.ts";
import * as tun from "../../ffi/tap.ts";
import { NetNamespace } from "../support/netns.ts";
import { BackendUnderTest, GuestRam, Vmm, DriverQueue } from "../support/frontend.ts";

test("net smoke", async () => {
  const ns = NetNamespace.create();
  try {
    ns.addTap("t0", { vnetHdr: true, up: true });
    const { fd, pfd } = ns.enter(() => {
      const fd = tun.openTunDevice(true);
      tun.tunSetIff(fd, "t0", tun.IFF_TAP | tun.IFF_NO_PI | tun.IFF_VNET_HDR);
      const ifindex = tun.withControlSocket((s) => tun.ifIndex(s, "t0"));
      const pfd = check(libc.socket(17, 3 | 0o4000, 0x0300), "socket");
      const sll = new Uint8Array(20); const v = new DataView(sll.buffer);
      v.setUint16(0, 17, true); v.setUint16(2, 0x0300, true); v.setInt32(4, ifindex, true);
      check(libc.bind(pfd, sll, 20), "bind");
      return { fd, pfd, ifindex };
    });
    const b = new BackendUnderTest("net", { "tap-fd": String(fd), mac: "02:00:00:00:00:42" });
    await b.ready;
    const ram = new GuestRam(1 << 22);
    const vmm = new Vmm(b, ram);
    vmm.activate(2, 64);
    const [rx, tx] = vmm.queues as [DriverQueue, DriverQueue];
    // tx
    const frame = new Uint8Array(60); frame.fill(0xff, 0, 6); frame.set([2,0,0,0,0,0x42], 6); frame[12]=0x88; frame[13]=0xb5; frame.fill(7, 14);
    const g = ram.alloc(72); ram.bytes(g, 72).set(frame, 12);
    tx.addChain([{ gpa: g, len: 72 }]);
    await tx.waitUsed(1);
    await Bun.sleep(50);
    const buf = new Uint8Array(2000);
    let got = -1;
    for (let i = 0; i < 100 && got < 0; i++) { got = read(pfd, buf, 2000); if (got < 0) await Bun.sleep(10); }
    expect(got).toBe(60);
    expect(Buffer.from(buf.subarray(0, 60)).equals(Buffer.from(frame))).toBe(true);
    // rx
    for (let i = 0; i < 4; i++) { const r = ram.alloc(2048); rx.addChain([{ gpa: r, len: 2048, write: true }]); }
    const f2 = frame.slice(); f2.set([2,0,0,0,0,0x42], 0); f2.set([2,0,0,0,0,0x99], 6); f2[20] = 0x55;
    expect(write(pfd, f2, 60)).toBe(60);
    const used = await rx.waitUsed(1);
    expect(used[0]!.len).toBe(72);
    console.log("rx used", used);
    vmm.dispose(); ram.dispose(); close(pfd); await b.stop();
  } finally { ns.destroy(); }
});
