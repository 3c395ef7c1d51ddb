// Run by snd_logic.test.ts in a child process: libasound reads ALSA_CONFIG_PATH from the C
// environment at its first open, and Bun's process.env does not reach that, so the test starts
// this script with the variable set. Plays and records through `file` plugin PCMs over ALSA's
// `null` PCM (no sound hardware needed) and prints what happened as JSON.
import * as A from "../../ffi/alsa.ts";

function configure(pcm: A.PcmHandle, channels: number, rate: number, periodFrames: number) {
  const s = A.alsa();
  const hw = A.hwParams();
  A.alsaCheck(s.snd_pcm_hw_params_any(pcm, hw), "snd_pcm_hw_params_any");
  const tests = {
    s16: s.snd_pcm_hw_params_test_format(pcm, hw, A.SND_PCM_FORMAT_S16_LE),
    rate: s.snd_pcm_hw_params_test_rate(pcm, hw, rate, 0),
    channels: s.snd_pcm_hw_params_test_channels(pcm, hw, channels),
  };
  A.alsaCheck(s.snd_pcm_hw_params_set_access(pcm, hw, A.SND_PCM_ACCESS_RW_INTERLEAVED), "set_access");
  A.alsaCheck(s.snd_pcm_hw_params_set_format(pcm, hw, A.SND_PCM_FORMAT_S16_LE), "set_format");
  A.alsaCheck(s.snd_pcm_hw_params_set_channels(pcm, hw, channels), "set_channels");
  const gotRate = A.hwSetRateNear(pcm, hw, rate);
  const period = A.hwSetPeriodSizeNear(pcm, hw, periodFrames);
  const buffer = A.hwSetBufferSizeNear(pcm, hw, periodFrames * 4);
  A.alsaCheck(s.snd_pcm_hw_params(pcm, hw), "snd_pcm_hw_params");
  return { tests, gotRate, period, buffer, periodAfter: A.hwGetPeriodSize(hw), bufferAfter: A.hwGetBufferSize(hw) };
}

const s = A.alsa();
const out: Record<string, unknown> = {};

// Playback: 10 periods of a ramp through `tofile`.
const play = A.pcmOpen("tofile", A.SND_PCM_STREAM_PLAYBACK, A.SND_PCM_NONBLOCK);
out.playConfig = configure(play, 2, 48000, 480);
const sw = A.swParams();
A.alsaCheck(s.snd_pcm_sw_params_current(play, sw), "sw_params_current");
A.alsaCheck(s.snd_pcm_sw_params_set_start_threshold(play, sw, 480n), "set_start_threshold");
A.alsaCheck(s.snd_pcm_sw_params_set_avail_min(play, sw, 480n), "set_avail_min");
A.alsaCheck(s.snd_pcm_sw_params(play, sw), "sw_params");
A.alsaCheck(s.snd_pcm_prepare(play), "prepare");
out.preparedState = s.snd_pcm_state(play);
const period = new Uint8Array(480 * 4);
let written = 0;
for (let i = 0; i < 10; i++) {
  for (let j = 0; j < period.length; j++) period[j] = (i * 7 + j) & 0xff;
  const r = A.writei(play, period, 480);
  if (r < 0) A.alsaCheck(s.snd_pcm_recover(play, r, 1), "recover");
  else written += r;
}
out.written = written;
out.runningState = s.snd_pcm_state(play);
out.avail = Number(s.snd_pcm_avail_update(play));
const pd = A.pollDescriptors(play);
out.pollCount = pd.count;
out.pollFd = new DataView(pd.fds.buffer).getInt32(0, true);
out.revents = A.pollRevents(play, pd.fds, pd.count);
A.alsaCheck(s.snd_pcm_drain(play), "drain");
A.alsaCheck(s.snd_pcm_drop(play), "drop");
A.pcmClose(play);

// Capture: the `fromfile` PCM reads its infile.
const cap = A.pcmOpen("fromfile", A.SND_PCM_STREAM_CAPTURE, A.SND_PCM_NONBLOCK);
out.capConfig = configure(cap, 2, 48000, 480);
A.alsaCheck(s.snd_pcm_prepare(cap), "prepare capture");
A.alsaCheck(s.snd_pcm_start(cap), "start capture");
const rec = new Uint8Array(1200 * 4);
out.readFrames = A.readi(cap, rec, 1200);
out.recorded = Buffer.from(rec).toString("base64");
A.pcmClose(cap);

try {
  A.pcmOpen("no_such_pcm", A.SND_PCM_STREAM_PLAYBACK, A.SND_PCM_NONBLOCK);
  out.unknownPcm = "opened";
} catch (e) {
  out.unknownPcm = (e as Error).message;
  out.unknownPcmIsAlsaError = e instanceof A.AlsaError;
}
out.strerrorEpipe = A.strerror(-A.EPIPE);

console.log(JSON.stringify(out));
