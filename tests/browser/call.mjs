// Relay-only WebRTC calls in headless Chromium (Debian's /usr/bin/chromium,
// driven by playwright-core), one page per variant: two RTCPeerConnections
// with iceTransportPolicy "relay" exchange data-channel messages both ways
// and fake camera + microphone media, and report what getStats() saw.
//
// Usage: node call.mjs '<json>' where json is
//   { "spki": "<base64 sha256 of the TLS key's SPKI, for turns:>",
//     "variants": [{ "name", "iceServers", "messages", "media", "expectFail", "timeoutMs" }] }
// Prints one JSON array of results on stdout.
import { start } from './launch.mjs';

const cfg = JSON.parse(process.argv[2]);

const { browser, url, close } = await start({ spki: cfg.spki });

async function callInPage({ iceServers, messages, media, expectFail, budgetMs }) {
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  const deadline = Date.now() + budgetMs;
  const waitFor = async (cond, what) => {
    while (!cond()) {
      if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
      await sleep(50);
    }
  };
  const config = { iceServers, iceTransportPolicy: 'relay' };
  const pc1 = new RTCPeerConnection(config);
  const pc2 = new RTCPeerConnection(config);
  const relayCandidates = { pc1: 0, pc2: 0 };
  const wire = (from, to, name) => {
    from.onicecandidate = (e) => {
      if (!e.candidate) return;
      if (e.candidate.type === 'relay') relayCandidates[name] += 1;
      to.addIceCandidate(e.candidate).catch(() => {});
    };
  };
  wire(pc1, pc2, 'pc1');
  wire(pc2, pc1, 'pc2');

  if (media) {
    const stream = await navigator.mediaDevices.getUserMedia({ audio: true, video: true });
    for (const t of stream.getTracks()) pc1.addTrack(t, stream);
  }
  const dc1 = pc1.createDataChannel('chat', { ordered: true });
  let dc2 = null;
  pc2.ondatachannel = (e) => { dc2 = e.channel; };

  const offer = await pc1.createOffer();
  await pc1.setLocalDescription(offer);
  await pc2.setRemoteDescription(offer);
  const answer = await pc2.createAnswer();
  await pc2.setLocalDescription(answer);
  await pc1.setRemoteDescription(answer);

  if (expectFail) {
    // Without credentials the server accepts, gathering ends with no relay candidate.
    await waitFor(() => pc1.iceGatheringState === 'complete', 'ICE gathering');
    const result = { relayCandidates: relayCandidates.pc1 + relayCandidates.pc2, connection: pc1.connectionState };
    pc1.close();
    pc2.close();
    return result;
  }

  await waitFor(() => pc1.connectionState === 'connected' && pc2.connectionState === 'connected', 'connection');
  await waitFor(() => dc1.readyState === 'open' && dc2 && dc2.readyState === 'open', 'data channel');
  const got1 = [];
  const got2 = [];
  dc1.onmessage = (e) => got1.push(e.data);
  dc2.onmessage = (e) => got2.push(e.data);
  for (let i = 0; i < messages; i += 1) {
    dc1.send(`ping ${i} ${'x'.repeat(i % 200)}`);
    dc2.send(`pong ${i}`);
  }
  await waitFor(() => got1.length >= messages && got2.length >= messages, 'messages');
  const intact =
    got2.every((m, i) => m === `ping ${i} ${'x'.repeat(i % 200)}`) && got1.every((m, i) => m === `pong ${i}`);

  let framesDecoded = 0;
  let audioPackets = 0;
  if (media) {
    const frames = async () => {
      const stats = await pc2.getStats();
      let f = 0;
      let a = 0;
      stats.forEach((s) => {
        if (s.type === 'inbound-rtp' && s.kind === 'video') f = s.framesDecoded || 0;
        if (s.type === 'inbound-rtp' && s.kind === 'audio') a = s.packetsReceived || 0;
      });
      return [f, a];
    };
    while (framesDecoded < 30 || audioPackets < 50) {
      if (Date.now() > deadline) throw new Error(`timed out waiting for media (${framesDecoded} frames)`);
      [framesDecoded, audioPackets] = await frames();
      await sleep(200);
    }
  }

  const pair = async (pc) => {
    const stats = await pc.getStats();
    let pairId = null;
    stats.forEach((s) => {
      if (s.type === 'transport' && s.selectedCandidatePairId) pairId = s.selectedCandidatePairId;
    });
    const p = stats.get(pairId);
    const local = stats.get(p.localCandidateId);
    const remote = stats.get(p.remoteCandidateId);
    return {
      local: local.candidateType,
      remote: remote.candidateType,
      relayProtocol: local.relayProtocol,
      bytesSent: p.bytesSent,
      bytesReceived: p.bytesReceived,
    };
  };
  const result = {
    messagesSent: messages * 2,
    messagesReceived: got1.length + got2.length,
    intact,
    framesDecoded,
    audioPackets,
    pc1: await pair(pc1),
    pc2: await pair(pc2),
  };
  pc1.close();
  pc2.close();
  return result;
}

const results = [];
for (const v of cfg.variants) {
  const page = await browser.newPage();
  const budgetMs = v.timeoutMs || 30000;
  try {
    await page.goto(url);
    const r = await page.evaluate(callInPage, {
      iceServers: v.iceServers,
      messages: v.messages || 300,
      media: v.media !== false,
      expectFail: !!v.expectFail,
      budgetMs,
    });
    results.push({ name: v.name, ok: true, ...r });
  } catch (e) {
    results.push({ name: v.name, ok: false, error: String(e && e.message ? e.message : e) });
  }
  await page.close();
}
console.log(JSON.stringify(results));
await close();
