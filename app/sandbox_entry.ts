// The entry point of the sandbox's re-exec'd image when the backend runs from sources
// (`bun app/main.ts`; the compiled binary evaluates its bundle before its event loop first turns
// and needs none). app/sandbox.ts puts this file in place of app/main.ts in the execve's argv.
//
// No static imports here, on purpose: Bun loads a module's imports with its event loop turning,
// and it waits in that loop with every signal unblocked (epoll_pwait2 with an empty mask). A stop
// held across the execve (src/sandbox/index.ts, holdSignals) would then be delivered while
// app/main.ts's imports load, before any handler exists, and kill the process by the default
// action, leaving its socket file behind. A module without imports is evaluated before the loop
// turns: it records a stop first (app/sandbox.ts, takeEarlyStop, reads the same slot), then loads
// the program.
const EARLY_STOP = Symbol.for("vhost-backend.sandbox.early-stop");
const slot = globalThis as unknown as Record<symbol, string | undefined>;
for (const sig of ["SIGTERM", "SIGINT", "SIGHUP"] as const) process.on(sig, () => (slot[EARLY_STOP] ??= sig));

const { runCli } = await import("./main.ts");
runCli();
