// A relay-only WebRTC call in headless Chromium that keeps running while the
// TURN server is upgraded under it: two RTCPeerConnections (iceTransportPolicy
// "relay") with a data channel sending a numbered message every 20 ms each
// way and fake camera + microphone media.
//
// Usage: node upgrade.mjs '<json>' with { "iceServers": [...], "afterMs": 4000 }.
// Prints "CONNECTED" once the call is up and messages flow, then waits for a
// line on stdin (the test upgrades the server, then writes one), lets the
// call run `afterMs` longer and prints one JSON object: messages sent and
// received each way, whether they arrived complete and in order, the longest
// gap between two arrivals, every connection state the call went through,
// the selected candidate pair before and after, and video frames decoded
// after the upgrade began.
import readline from 'node:readline';
import { start } from './launch.mjs';

const cfg = JSON.parse(process.argv[2]);
const { browser, url, close } = await start({});
const page = await browser.newPage();
await page.goto(url);

const connected = await page.evaluate(async ({ iceServers }) => {
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  const config = { iceServers, iceTransportPolicy: 'relay' };
  const pc1 = new RTCPeerConnection(config);
  const pc2 = new RTCPeerConnection(config);
  for (const [from, to] of [[pc1, pc2], [pc2, pc1]]) {
    from.onicecandidate = (e) => e.candidate && to.addIceCandidate(e.candidate).catch(() => {});
  }
  const states = [];
  for (const [name, pc] of [['pc1', pc1], ['pc2', pc2]]) {
    pc.onconnectionstatechange = () => states.push(`${name}:${pc.connectionState}`);
  }
  const stream = await navigator.mediaDevices.getUserMedia({ audio: true, video: true });
  for (const t of stream.getTracks()) pc1.addTrack(t, stream);
  const dc1 = pc1.createDataChannel('call', { ordered: true });
  let dc2 = null;
  pc2.ondatachannel = (e) => { dc2 = e.channel; };
  await pc1.setLocalDescription(await pc1.createOffer());
  await pc2.setRemoteDescription(pc1.localDescription);
  await pc2.setLocalDescription(await pc2.createAnswer());
  await pc1.setRemoteDescription(pc2.localDescription);
  const deadline = Date.now() + 30000;
  while (!(dc2 && dc1.readyState === 'open' && dc2.readyState === 'open')) {
    if (Date.now() > deadline) return false;
    await sleep(50);
  }
  const call = { pc1, pc2, states, sent: [0, 0], got: [[], []], gap: 0, last: 0 };
  const receive = (i) => (e) => {
    const now = performance.now();
    if (call.last) call.gap = Math.max(call.gap, now - call.last);
    call.last = now;
    call.got[i].push(Number(e.data));
  };
  dc1.onmessage = receive(0);
  dc2.onmessage = receive(1);
  call.timer = setInterval(() => {
    dc1.send(String(call.sent[1]++));
    dc2.send(String(call.sent[0]++));
  }, 20);
  call.pair = async (pc) => {
    const stats = await pc.getStats();
    let id = null;
    stats.forEach((s) => { if (s.type === 'transport' && s.selectedCandidatePairId) id = s.selectedCandidatePairId; });
    const p = stats.get(id);
    return p ? `${stats.get(p.localCandidateId).address}:${stats.get(p.localCandidateId).port}` : null;
  };
  call.frames = async () => {
    let f = 0;
    (await pc2.getStats()).forEach((s) => { if (s.type === 'inbound-rtp' && s.kind === 'video') f = s.framesDecoded || 0; });
    return f;
  };
  await sleep(1000);
  call.before = [await call.pair(pc1), await call.pair(pc2)];
  window.call = call;
  return call.got[0].length > 0 && call.got[1].length > 0;
}, { iceServers: cfg.iceServers });

if (!connected) {
  console.log(JSON.stringify({ ok: false, error: 'the call did not connect' }));
  await close();
  process.exit(0);
}
console.log('CONNECTED');
const rl = readline.createInterface({ input: process.stdin });
await new Promise((resolve) => rl.once('line', resolve));
rl.close();

const result = await page.evaluate(async ({ afterMs }) => {
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  const call = window.call;
  const framesAtUpgrade = await call.frames();
  await sleep(afterMs);
  clearInterval(call.timer);
  await sleep(1000);
  const complete = (got, n) => got.length === n && got.every((v, i) => v === i);
  return {
    ok: true,
    sent: call.sent,
    received: [call.got[0].length, call.got[1].length],
    complete: complete(call.got[0], call.sent[0]) && complete(call.got[1], call.sent[1]),
    longestGapMs: Math.round(call.gap),
    states: call.states,
    before: call.before,
    after: [await call.pair(call.pc1), await call.pair(call.pc2)],
    framesAfterUpgrade: (await call.frames()) - framesAtUpgrade,
  };
}, { afterMs: cfg.afterMs || 4000 });
console.log(JSON.stringify(result));
await close();
