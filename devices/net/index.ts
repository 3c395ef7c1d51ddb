// `backend device net --socket PATH --tap-name TAP`: a virtio-net device over a Linux tap
// (crosvm's `device net`, DPDK's vhost + tap), for QEMU's `-netdev vhost-user`, crosvm and
// DPDK's virtio_user.
import type { DeviceDefinition } from "../../src/device.ts";
import { NET_ARGS, NET_REPEATABLE, parseNetOptions, resolveSocket, type NetOptions } from "./options.ts";
import { acquireNet, releaseNet, type AcquiredNet } from "./acquire.ts";
import { NO_HOST_ACCESS } from "../../src/host_access.ts";
import { NetDevice } from "./device.ts";
import { netPairRunner } from "./pair_runner.ts";
import { VIRTIO_ID_NET } from "./virtio_net.ts";

export const netDevice: DeviceDefinition<NetOptions, AcquiredNet> = {
  name: "net",
  virtioId: VIRTIO_ID_NET,
  description: "virtio-net over a Linux tap (offloads, mergeable rx buffers, multiqueue)",
  capabilities: { type: "net" },
  example: ["--socket", "/run/vm/net.sock", "--tap-name", "vmtap0"],
  args: NET_ARGS,
  repeatable: NET_REPEATABLE,
  socketPath(raw) {
    return resolveSocket(raw, parseNetOptions(raw));
  },
  parse: parseNetOptions,
  // The tap (attached or created, its queues, the offload probe), a control socket and each pair's
  // io_uring, made in the main thread before serving; after that net opens nothing, creates no
  // socket and sets up no ring.
  acquire: acquireNet,
  release: releaseNet,
  hostAccess: () => ({ ...NO_HOST_ACCESS, hostNetwork: true, syscallGroups: ["tap", "io_uring"] }),
  create(o, tap, ctx) {
    return new NetDevice(o, tap, ctx);
  },
  queueRunner: netPairRunner,
};

export default netDevice;
