// What the browser test reads back, shared by both SDK generations: window.rtvi is plain data (JSON-able).
export function newState() {
  return {
    botReady: null,
    userFinals: [],
    userInterims: 0,
    botTranscripts: [],
    botOutputs: [],
    speaking: [],
    errors: [],
    tools: [],
    posted: 0,
    connected: false,
    failed: null,
  };
}

// Count the PCM the SDK hands its own player (WavStreamPlayer), and ask the player's worklet what it played.
export function watchPlayer(state, player) {
  const add = player.add16BitPCM.bind(player);
  player.add16BitPCM = (buffer, trackId) => {
    const out = add(buffer, trackId);
    if (out) state.posted += out.length;
    return out;
  };
  return async () => ((await player.getTrackSampleOffset()) || { offset: 0 }).offset;
}

// The front end's own /ws/tools socket for this user (as FunVoiceChat front ends open it).
export function openTools(state, toolsUrl) {
  const ws = new WebSocket(toolsUrl);
  ws.onmessage = (e) => state.tools.push(JSON.parse(e.data));
  return new Promise((resolve, reject) => {
    ws.onopen = () => resolve(ws);
    ws.onerror = () => reject(new Error("tools socket failed"));
  });
}
