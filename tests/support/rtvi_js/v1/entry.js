// @pipecat-ai/client-js 1.x + @pipecat-ai/websocket-transport 1.x, as a Next.js front end uses them,
// with the package's WavMediaManager instead of the default Daily one (which loads a script from the internet).
import { PipecatClient } from "@pipecat-ai/client-js";
import { WavMediaManager, WebSocketTransport } from "@pipecat-ai/websocket-transport";
import { newState, openTools, watchPlayer } from "../common.js";

window.startRtvi = async ({ connectUrl, token, userId, toolsUrl }) => {
  const state = (window.rtvi = newState());
  try {
    await openTools(state, toolsUrl);
    const mediaManager = new WavMediaManager(512, 16000);
    window.playedSamples = watchPlayer(state, mediaManager._wavStreamPlayer);
    const client = new PipecatClient({
      transport: new WebSocketTransport({ mediaManager }),
      enableMic: true,
      enableCam: false,
      callbacks: {
        onConnected: () => (state.connected = true),
        onBotReady: (data) => (state.botReady = data),
        onUserTranscript: (data) => (data.final ? state.userFinals.push(data) : state.userInterims++),
        onBotTranscript: (data) => state.botTranscripts.push(data.text),
        onBotOutput: (data) => state.botOutputs.push(data.text),
        onBotStartedSpeaking: () => state.speaking.push("bot-started"),
        onBotStoppedSpeaking: () => state.speaking.push("bot-stopped"),
        onUserStartedSpeaking: () => state.speaking.push("user-started"),
        onUserStoppedSpeaking: () => state.speaking.push("user-stopped"),
        onError: (message) => state.errors.push(message.data),
      },
    });
    window.sendText = (text) => client.sendText(text);
    await client.startBotAndConnect({
      endpoint: connectUrl,
      headers: new Headers({ Authorization: `Bearer ${token}` }),
      requestData: { user_id: userId },
    });
  } catch (e) {
    state.failed = String(e && (e.message || e));
  }
};
