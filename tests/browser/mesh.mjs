// A full mesh of participants in one headless Chromium page (Debian's
// /usr/bin/chromium, driven by playwright-core), as browser games and chat
// apps build one: every participant opens one RTCPeerConnection per other
// participant, relay-only, with every TURN URL it was given. Each pair opens
// a data channel and exchanges messages both ways; the report says, per
// pair, whether it connected, what arrived, and the selected candidate pair.
//
// Usage: node mesh.mjs '<json>' where json is
//   { "participants": [{ "iceServers": [...] }, ...], "messages": 50, "timeoutMs": 90000 }
// Prints one JSON object on stdout: { "pairs": [...], "peerConnections": N }.
import { start } from './launch.mjs';

const cfg = JSON.parse(process.argv[2]);

const { browser, url, close } = await start();

async function mesh({ participants, messages, budgetMs }) {
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  const deadline = Date.now() + budgetMs;
  const waitFor = async (cond) => {
    while (!cond()) {
      if (Date.now() > deadline) return false;
      await sleep(50);
    }
    return true;
  };
  const pc = (i) => new RTCPeerConnection({ iceServers: participants[i].iceServers, iceTransportPolicy: 'relay' });

  // One entry per pair: a's connection to b and b's connection to a.
  const pairs = [];
  for (let a = 0; a < participants.length; a += 1) {
    for (let b = a + 1; b < participants.length; b += 1) {
      const p = { name: `${a}-${b}`, a: pc(a), b: pc(b), got: { a: [], b: [] }, dcB: null };
      p.a.onicecandidate = (e) => e.candidate && p.b.addIceCandidate(e.candidate).catch(() => {});
      p.b.onicecandidate = (e) => e.candidate && p.a.addIceCandidate(e.candidate).catch(() => {});
      p.dcA = p.a.createDataChannel('game', { ordered: true });
      p.b.ondatachannel = (e) => {
        p.dcB = e.channel;
      };
      pairs.push(p);
    }
  }
  // Everybody negotiates at once, as a room that just filled up does.
  await Promise.all(
    pairs.map(async (p) => {
      const offer = await p.a.createOffer();
      await p.a.setLocalDescription(offer);
      await p.b.setRemoteDescription(offer);
      const answer = await p.b.createAnswer();
      await p.b.setLocalDescription(answer);
      await p.a.setRemoteDescription(answer);
    }),
  );

  const selected = async (conn) => {
    const stats = await conn.getStats();
    let pairId = null;
    stats.forEach((s) => {
      if (s.type === 'transport' && s.selectedCandidatePairId) pairId = s.selectedCandidatePairId;
    });
    const sp = pairId && stats.get(pairId);
    if (!sp) return null;
    const local = stats.get(sp.localCandidateId);
    const remote = stats.get(sp.remoteCandidateId);
    return { local: local.candidateType, remote: remote.candidateType, relayProtocol: local.relayProtocol };
  };

  const results = await Promise.all(
    pairs.map(async (p) => {
      const open = await waitFor(
        () => p.dcA.readyState === 'open' && p.dcB && p.dcB.readyState === 'open',
      );
      if (!open) {
        return { pair: p.name, ok: false, a: p.a.connectionState, b: p.b.connectionState };
      }
      p.dcA.onmessage = (e) => p.got.a.push(e.data);
      p.dcB.onmessage = (e) => p.got.b.push(e.data);
      for (let i = 0; i < messages; i += 1) {
        p.dcA.send(`${p.name} a ${i}`);
        p.dcB.send(`${p.name} b ${i}`);
      }
      const all = await waitFor(() => p.got.a.length >= messages && p.got.b.length >= messages);
      const intact =
        p.got.b.every((m, i) => m === `${p.name} a ${i}`) && p.got.a.every((m, i) => m === `${p.name} b ${i}`);
      return {
        pair: p.name,
        ok: all && intact,
        received: p.got.a.length + p.got.b.length,
        a: await selected(p.a),
        b: await selected(p.b),
      };
    }),
  );
  for (const p of pairs) {
    p.a.close();
    p.b.close();
  }
  return { pairs: results, peerConnections: pairs.length * 2 };
}

let out;
const page = await browser.newPage();
try {
  await page.goto(url);
  out = await page.evaluate(mesh, {
    participants: cfg.participants,
    messages: cfg.messages || 50,
    budgetMs: cfg.timeoutMs || 90000,
  });
} catch (e) {
  out = { error: String(e && e.message ? e.message : e), pairs: [] };
}
await page.close();
console.log(JSON.stringify(out));
await close();
