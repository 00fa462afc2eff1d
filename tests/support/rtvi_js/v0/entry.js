// @pipecat-ai/client-js 0.4.1 + @pipecat-ai/websocket-transport 0.4.2, as the existing Next.js front ends
// use them. This transport always builds the default Daily media manager; it is swapped for the same
// package's WavMediaManager (the default one loads a script from the internet), before the client
// hands it its options.
import { LLMHelper, RTVIClient } from "@pipecat-ai/client-js";
import { WavMediaManager, WebSocketTransport } from "@pipecat-ai/websocket-transport";
import { newState, openTools, watchPlayer } from "../common.js";

window.startRtvi = async ({ baseUrl, token, userId, toolsUrl }) => {
  const state = (window.rtvi = newState());
  try {
    await openTools(state, toolsUrl);
    const transport = new WebSocketTransport();
    const mediaManager = new WavMediaManager(512, 16000);
    mediaManager.setUserAudioCallback(transport.handleUserAudioStream.bind(transport));
    transport._mediaManager = mediaManager;
    window.playedSamples = watchPlayer(state, mediaManager._wavStreamPlayer);
    const client = new RTVIClient({
      transport,
      params: {
        baseUrl,
        headers: new Headers({ Authorization: `Bearer ${token}` }),
        requestData: { user_id: userId },
      },
      enableMic: true,
      enableCam: false,
      callbacks: {
        onConnected: () => (state.connected = true),
        onBotReady: (data) => (state.botReady = data),
        onUserTranscript: (data) => (data.final ? state.userFinals.push(data) : state.userInterims++),
        onBotTranscript: (data) => state.botTranscripts.push(data.text),
        onBotStartedSpeaking: () => state.speaking.push("bot-started"),
        onBotStoppedSpeaking: () => state.speaking.push("bot-stopped"),
        onUserStartedSpeaking: () => state.speaking.push("user-started"),
        onUserStoppedSpeaking: () => state.speaking.push("user-stopped"),
        onError: (message) => state.errors.push(message.data),
      },
    });
    const llm = client.registerHelper("llm", new LLMHelper({}));
    window.sendText = (text) => llm.appendToMessages({ role: "user", content: text }, true);
    await client.connect();
  } catch (e) {
    state.failed = String(e && (e.message || e));
  }
};
