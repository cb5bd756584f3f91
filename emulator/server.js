#!/usr/bin/env node
/*
 * Ouroboros Telegram Bot API emulator for end-to-end tests.
 *
 * A thin launcher around the npm package `telegram-test-api` (4.2.1): its
 * TelegramServer keeps the update/message storage, ids, webhooks and the
 * client-side history routes; this file puts its own HTTP front in front of
 * the package's express app to bridge the gaps that matter to
 * python-telegram-bot 22.x (see README.md). Nothing in node_modules is edited.
 *
 *   node server.js [--port N] [--exit-on-stdin-close] [--bot-username NAME]
 *
 * Listens on 127.0.0.1 only; --port 0 (default) picks a free port. Prints one
 * JSON line {"ready": true, "port": N} on stdout once listening. SIGTERM/SIGINT
 * (or stdin closing, with --exit-on-stdin-close) stop it cleanly.
 *
 * Bot side:   /bot<token>/<method>            (Bot API shapes, GET or POST,
 *                                              JSON / urlencoded / multipart)
 *             /file/bot<token>/<file_path>     (file downloads, see getFile)
 * User side:  POST /sendMessage /sendCommand /sendCallback   (package routes, wrapped)
 *             POST /getUpdates /getUpdatesHistory            (package routes, untouched)
 * Test hooks: /_faults /_messages /_calls /_callbackAnswers /_commands
 *             /_drafts /_sendUpdate /_files /_reset /_health
 */
'use strict';

const http = require('http');
const crypto = require('crypto');
const TelegramServer = require('telegram-test-api');

// ---------------------------------------------------------------- arguments
function parseArgs(argv) {
  const opts = { port: 0, exitOnStdinClose: false, botUsername: 'TestNameBot', botName: 'Test First name' };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--port') opts.port = Number(argv[++i]);
    else if (a.startsWith('--port=')) opts.port = Number(a.slice(7));
    else if (a === '--exit-on-stdin-close') opts.exitOnStdinClose = true;
    else if (a === '--bot-username') opts.botUsername = argv[++i];
    else if (a === '--bot-name') opts.botName = argv[++i];
    else throw new Error(`unknown argument: ${a}`);
  }
  if (!Number.isInteger(opts.port) || opts.port < 0 || opts.port > 65535) {
    throw new Error('--port must be an integer in 0..65535');
  }
  return opts;
}
const OPTS = parseArgs(process.argv.slice(2));

// ---------------------------------------------------------------- limits (Telegram's)
const MAX_TEXT = 4096;           // sendMessage / editMessageText, after entity parsing
const MAX_CAPTION = 1024;
const MAX_CALLBACK_DATA_BYTES = 64;
const MAX_BODY_BYTES = 60 * 1024 * 1024;
const MAX_POLL_SECONDS = 50;
const CHAT_ACTIONS = new Set(['typing', 'upload_photo', 'record_video', 'upload_video', 'record_voice',
  'upload_voice', 'upload_document', 'choose_sticker', 'find_location', 'record_video_note',
  'upload_video_note']);
const MEDIA_METHODS = {
  sendphoto: 'photo', senddocument: 'document', sendaudio: 'audio', sendvideo: 'video',
  sendanimation: 'animation', sendvoice: 'voice', sendvideonote: 'video_note', sendsticker: 'sticker',
};
const NOOP_TRUE_METHODS = new Set(['logout', 'close', 'setmydescription', 'setmyshortdescription', 'setmyname',
  'setchatmenubutton', 'setmydefaultadministratorrights', 'pinchatmessage', 'unpinchatmessage',
  'unpinallchatmessages', 'setmessagereaction']);

// ---------------------------------------------------------------- the package
// storeTimeout: keep everything for the life of the process (we never call
// tg.start(), so its clean-up daemon never runs anyway).
const tg = new TelegramServer({ port: OPTS.port, host: '127.0.0.1', storeTimeout: 24 * 3600 });
tg.setMaxListeners(0);

// Patch 1: updates handed to the bot (getUpdates and webhooks) must not carry
// the package's internal `botToken` field, callback queries need the required
// `chat_instance`, and raw updates injected through /_sendUpdate pass through.
const originalFormatUpdate = TelegramServer.formatUpdate;
TelegramServer.formatUpdate = function formatUpdate(update) {
  if (update.rawUpdate) return { update_id: update.updateId, ...update.rawUpdate };
  const out = originalFormatUpdate.call(TelegramServer, update);
  if (out.message) {
    out.message = { ...out.message };
    delete out.message.botToken;
  }
  if (out.callback_query) {
    const cq = update.callbackQuery;
    out.callback_query.chat_instance = cq.chat_instance || '0';
    if (cq.inline_message_id) out.callback_query.inline_message_id = cq.inline_message_id;
  }
  return out;
};

// ---------------------------------------------------------------- state
const state = {
  chats: new Map(),          // String(chat_id) -> Chat object (learned from user messages)
  messages: new Map(),       // `${token}|${chat_id}|${message_id}` -> record (see recordView)
  confirmed: new Map(),      // token -> lowest update_id not yet confirmed by an offset
  faults: [],                // {method, token, status, description, retry_after, delay_ms, drop, remaining}
  calls: [],                 // bot API call log
  callSeq: 0,
  callbacks: new Map(),      // callback_query_id -> {token, chat_id, message_id, answered, answer}
  commands: new Map(),       // `${token}|${scope}|${lang}` -> BotCommand[]
  files: new Map(),          // file_id -> {file_id, file_unique_id, file_name, mime_type, bytes, file_path}
  drafts: new Map(),         // `${token}|${chat_id}` -> [{draft_id, text, time}] (sendMessageDraft, in order)
  version: 0,                // bumps on every change of a stored message
  pollers: new Map(),        // token -> {res, wake}
};
const changeWaiters = new Set();

function bumpVersion() {
  state.version++;
  for (const w of [...changeWaiters]) w();
}
function wakePollers() {
  for (const p of state.pollers.values()) p.wake();
}
// the package emits these whenever a user update is stored
for (const ev of ['AddedUserMessage', 'AddedUserCommand', 'AddedUserCallbackQuery']) tg.on(ev, wakePollers);

function nowSeconds() { return Math.floor(Date.now() / 1000); }
function botIdFromToken(token) {
  const m = /^(\d+):/.exec(token);
  return m ? Number(m[1]) : 666;
}
function botUser(token) {
  return { id: botIdFromToken(token), is_bot: true, first_name: OPTS.botName, username: OPTS.botUsername };
}
function chatKey(chatId) { return String(chatId); }
function msgKey(token, chatId, messageId) { return `${token}|${chatKey(chatId)}|${Number(messageId)}`; }
function chatIdValue(chatId) {
  const n = Number(chatId);
  return Number.isFinite(n) && String(chatId).trim() !== '' ? n : chatId;
}
function chatFor(chatId) {
  const known = state.chats.get(chatKey(chatId));
  if (known) return { ...known };
  const id = chatIdValue(chatId);
  if (typeof id === 'number' && id < 0) return { id, type: 'group', title: `Chat ${id}` };
  return { id, type: 'private', first_name: 'User' };
}
function rememberChat(chat) {
  if (chat && chat.id !== undefined && chat.type) state.chats.set(chatKey(chat.id), { ...chat });
}
function fileUniqueId(fileId) {
  return crypto.createHash('sha1').update(fileId).digest('base64url').slice(0, 16);
}
function chatInstance(token, chatId) {
  return String(BigInt('0x' + crypto.createHash('sha1').update(`${token}|${chatId}`).digest('hex').slice(0, 15)));
}

class ApiError extends Error {
  constructor(code, description, parameters) {
    super(description);
    this.code = code;
    this.description = description;
    this.parameters = parameters;
  }
}
const bad = (msg) => new ApiError(400, `Bad Request: ${msg}`);

// ---------------------------------------------------------------- text helpers
/** Text as Telegram shows it after parsing parse_mode markup (approximate). */
function plainText(text, parseMode) {
  const s = String(text);
  const mode = parseMode ? String(parseMode).toLowerCase() : '';
  if (mode === 'html') {
    return s.replace(/<[^>]*>/g, '').replace(/&(lt|gt|amp|quot|#(\d+)|#x([0-9a-fA-F]+));/g, (all, name, dec, hex) => {
      if (dec) return String.fromCodePoint(Number(dec));
      if (hex) return String.fromCodePoint(parseInt(hex, 16));
      return { lt: '<', gt: '>', amp: '&', quot: '"' }[name];
    });
  }
  if (mode === 'markdown' || mode === 'markdownv2') {
    const marks = mode === 'markdown' ? '*_`[' : '*_~|`[';
    let out = '';
    for (let i = 0; i < s.length; i++) {
      const c = s[i];
      if (c === '\\' && i + 1 < s.length) { out += s[++i]; continue; }
      if (c === ']' && s[i + 1] === '(') {            // skip the (url) of a link
        let j = i + 2;
        while (j < s.length && s[j] !== ')') j += s[j] === '\\' ? 2 : 1;
        i = j;
        continue;
      }
      if (marks.includes(c)) continue;
      out += c;
    }
    return out;
  }
  return s;
}

function parseJsonParam(value, what) {
  if (value === undefined || value === null || value === '') return undefined;
  if (typeof value !== 'string') return value;
  try { return JSON.parse(value); } catch (e) { throw bad(`can't parse ${what} JSON object`); }
}

function parseReplyMarkup(value) {
  const markup = parseJsonParam(value, 'reply keyboard markup');
  if (markup === undefined) return undefined;
  if (typeof markup !== 'object' || Array.isArray(markup)) throw bad("can't parse reply keyboard markup JSON object");
  if ('inline_keyboard' in markup) {
    const rows = markup.inline_keyboard;
    if (!Array.isArray(rows) || rows.some((r) => !Array.isArray(r))) {
      throw bad('field "inline_keyboard" of the InlineKeyboardMarkup should be an Array of Arrays');
    }
    for (const row of rows) {
      for (const button of row) {
        if (!button || typeof button.text !== 'string') throw bad("can't parse inline keyboard button: Text buttons are unallowed in the inline keyboard");
        if ('callback_data' in button) {
          const n = Buffer.byteLength(String(button.callback_data), 'utf8');
          if (n < 1 || n > MAX_CALLBACK_DATA_BYTES) throw bad('BUTTON_DATA_INVALID');
        }
      }
    }
  }
  return markup;
}

function checkText(text, parseMode, { caption = false } = {}) {
  if (text === undefined || text === null) {
    if (caption) return undefined;
    throw bad('message text is empty');
  }
  const plain = plainText(text, parseMode);
  if (!caption && plain.trim() === '') throw bad('message text is empty');
  // JS string length counts UTF-16 code units, as Telegram does.
  if (caption && plain.length > MAX_CAPTION) throw bad('message caption is too long');
  if (!caption && plain.length > MAX_TEXT) throw bad('message is too long');
  return plain;
}

function requireChatId(p) {
  if (p.chat_id === undefined || p.chat_id === null || String(p.chat_id) === '') throw bad('chat_id is empty');
  return p.chat_id;
}

function replyTo(token, chatId, p) {
  let id = p.reply_to_message_id;
  const rp = parseJsonParam(p.reply_parameters, 'reply parameters');
  if (rp && rp.message_id !== undefined) id = rp.message_id;
  if (id === undefined) return undefined;
  const rec = state.messages.get(msgKey(token, (rp && rp.chat_id) || chatId, id));
  if (!rec || rec.deleted) {
    if (rp && (rp.allow_sending_without_reply === true || rp.allow_sending_without_reply === 'true')) return undefined;
    if (p.allow_sending_without_reply === true || p.allow_sending_without_reply === 'true') return undefined;
    throw bad('message to be replied not found');
  }
  const copy = { ...rec.message };
  delete copy.reply_to_message;
  return copy;
}

function inlineOnly(markup) {
  return markup && 'inline_keyboard' in markup ? markup : undefined;
}

// ---------------------------------------------------------------- message store
function storeRecord(token, message, fromBot, extra = {}) {
  const rec = {
    token,
    chat_id: chatKey(message.chat.id),
    message_id: message.message_id,
    from_bot: fromBot,
    message,
    deleted: false,
    edits: [],
    created: Date.now(),
    ...extra,
  };
  state.messages.set(msgKey(token, message.chat.id, message.message_id), rec);
  bumpVersion();
  return rec;
}

function recordView(rec) {
  return {
    message_id: rec.message_id,
    chat_id: chatIdValue(rec.chat_id),
    from_bot: rec.from_bot,
    deleted: rec.deleted,
    message: rec.message,
    raw_text: rec.raw_text,
    parse_mode: rec.parse_mode,
    sent_reply_markup: rec.sent_reply_markup,
    edits: rec.edits,
  };
}

/** Adds a bot message through the package (ids, storage) and fixes its shape. */
function addBotMessage(token, p, fields, extra) {
  const chatId = requireChatId(p);
  const reply = replyTo(token, chatId, p);
  // The package stores the raw request and returns a message whose `date` is in
  // milliseconds and whose chat is always {type:'private', first_name:'Bot'}.
  const raw = tg.addBotMessage({ ...p, chat_id: chatId, ...fields }, token);
  const message = {
    message_id: raw.message_id,
    from: botUser(token),
    chat: chatFor(chatId),
    date: nowSeconds(),
  };
  if (p.message_thread_id !== undefined) message.message_thread_id = Number(p.message_thread_id);
  if (reply) message.reply_to_message = reply;
  Object.assign(message, fields);
  const inline = inlineOnly(fields.reply_markup);
  if (inline) message.reply_markup = inline; else delete message.reply_markup;
  const rec = storeRecord(token, message, true, {
    raw_text: p.text !== undefined ? String(p.text) : (p.caption !== undefined ? String(p.caption) : undefined),
    parse_mode: p.parse_mode,
    sent_reply_markup: fields.reply_markup,
    ...extra,
  });
  return rec.message;
}

function findEditable(token, p) {
  if (p.inline_message_id) throw bad('inline messages are not supported by the emulator');
  const chatId = requireChatId(p);
  if (p.message_id === undefined) throw bad('message identifier is not specified');
  const rec = state.messages.get(msgKey(token, chatId, p.message_id));
  if (!rec || rec.deleted) throw bad('message to edit not found');
  if (!rec.from_bot) throw bad("message can't be edited");
  return rec;
}

const NOT_MODIFIED = 'message is not modified: specified new message content and reply markup are exactly the same as a current content and reply markup of the message';

function applyEdit(rec, changes, rawText, parseMode, markup) {
  const before = rec.message;
  const after = { ...before, ...changes };
  const inline = inlineOnly(markup);
  // Like Telegram: an edit without reply_markup removes the inline keyboard.
  if (inline) after.reply_markup = inline; else delete after.reply_markup;
  const same = ['text', 'caption'].every((k) => before[k] === after[k])
    && JSON.stringify(before.reply_markup || null) === JSON.stringify(after.reply_markup || null);
  if (same) throw bad(NOT_MODIFIED);
  after.edit_date = nowSeconds();
  rec.edits.push({ ...before });
  rec.message = after;
  if (rawText !== undefined) { rec.raw_text = rawText; rec.parse_mode = parseMode; }
  rec.sent_reply_markup = markup;
  bumpVersion();
  return after;
}

// ---------------------------------------------------------------- files
function imageSize(buf) {
  if (buf.length > 24 && buf.readUInt32BE(0) === 0x89504e47) {
    return { width: buf.readUInt32BE(16), height: buf.readUInt32BE(20) };
  }
  if (buf.length > 4 && buf[0] === 0xff && buf[1] === 0xd8) {             // JPEG: find SOFn
    let i = 2;
    while (i + 9 < buf.length) {
      if (buf[i] !== 0xff) { i++; continue; }
      const marker = buf[i + 1];
      const len = buf.readUInt16BE(i + 2);
      if (marker >= 0xc0 && marker <= 0xcf && ![0xc4, 0xc8, 0xcc].includes(marker)) {
        return { width: buf.readUInt16BE(i + 7), height: buf.readUInt16BE(i + 5) };
      }
      i += 2 + len;
    }
  }
  return { width: 0, height: 0 };
}

function storeFile(bytes, fileName, mimeType) {
  const fileId = `EMU-${crypto.randomBytes(12).toString('hex')}`;
  const f = {
    file_id: fileId,
    file_unique_id: fileUniqueId(fileId),
    file_name: fileName || 'file',
    mime_type: mimeType || 'application/octet-stream',
    bytes,
    file_path: `files/${fileId}/${encodeURIComponent(fileName || 'file')}`,
  };
  state.files.set(fileId, f);
  return f;
}

function resolveInputFile(value, parts) {
  if (value && typeof value === 'object' && value.isFile) return storeFile(value.data, value.filename, value.contentType);
  if (typeof value !== 'string' || value === '') throw bad('there is no file in the request');
  if (value.startsWith('attach://')) {
    const part = parts[value.slice(9)];
    if (!part || !part.isFile) throw bad('wrong file identifier/HTTP URL specified');
    return storeFile(part.data, part.filename, part.contentType);
  }
  if (state.files.has(value)) return state.files.get(value);
  if (/^https?:\/\//i.test(value)) {                 // cannot fetch (offline): record the URL only
    const f = storeFile(Buffer.alloc(0), value.split('/').pop() || 'remote', 'application/octet-stream');
    f.url = value;
    return f;
  }
  throw bad('wrong file identifier/HTTP URL specified');
}

function mediaObject(kind, f) {
  const base = { file_id: f.file_id, file_unique_id: f.file_unique_id, file_size: f.bytes.length };
  const { width, height } = imageSize(f.bytes);
  switch (kind) {
    case 'photo': return [{ ...base, width, height }];
    case 'document': return { ...base, file_name: f.file_name, mime_type: f.mime_type };
    case 'audio': case 'voice': return { ...base, duration: 0, mime_type: f.mime_type };
    case 'video': case 'animation': return { ...base, width, height, duration: 0, file_name: f.file_name, mime_type: f.mime_type };
    case 'video_note': return { ...base, length: width, duration: 0 };
    case 'sticker': return { ...base, width: width || 512, height: height || 512, is_animated: false, is_video: false, type: 'regular' };
    default: return base;
  }
}

// ---------------------------------------------------------------- bot methods
const methods = {
  getme: (token) => ({
    ...botUser(token), can_join_groups: true, can_read_all_group_messages: false,
    supports_inline_queries: false, can_connect_to_business: false, has_main_web_app: false,
  }),

  sendmessage: (token, p) => {
    const plain = checkText(p.text, p.parse_mode);
    const markup = parseReplyMarkup(p.reply_markup);
    return addBotMessage(token, p, { text: plain, reply_markup: markup });
  },

  editmessagetext: (token, p) => {
    const rec = findEditable(token, p);
    if (rec.message.text === undefined) throw bad('there is no text in the message to edit');
    const plain = checkText(p.text, p.parse_mode);
    const markup = parseReplyMarkup(p.reply_markup);
    const msg = applyEdit(rec, { text: plain }, String(p.text), p.parse_mode, markup);
    tg.editMessageText({ ...p, reply_markup: markup });              // keep the package's raw store in step
    return msg;
  },

  editmessagecaption: (token, p) => {
    const rec = findEditable(token, p);
    if (rec.message.text !== undefined) throw bad('there is no caption in the message to edit');
    const plain = checkText(p.caption, p.parse_mode, { caption: true });
    const markup = parseReplyMarkup(p.reply_markup);
    const changes = { caption: plain };
    const msg = applyEdit(rec, changes, p.caption === undefined ? undefined : String(p.caption), p.parse_mode, markup);
    if (plain === undefined) delete msg.caption;
    return msg;
  },

  editmessagereplymarkup: (token, p) => {
    const rec = findEditable(token, p);
    const markup = parseReplyMarkup(p.reply_markup);
    const msg = applyEdit(rec, {}, undefined, undefined, markup);
    tg.editMessageReplyMarkup({ ...p, reply_markup: markup });
    return msg;
  },

  deletemessage: (token, p) => {
    const chatId = requireChatId(p);
    const rec = state.messages.get(msgKey(token, chatId, p.message_id));
    if (!rec || rec.deleted) throw bad('message to delete not found');
    rec.deleted = true;
    tg.deleteMessage(Number(chatId), Number(p.message_id));
    bumpVersion();
    return true;
  },

  // Bot API 9.5: a partial message streamed into a private chat; ephemeral, so only recorded.
  sendmessagedraft: (token, p) => {
    const chatId = requireChatId(p);
    if (chatFor(chatId).type !== 'private') throw bad('TEXTDRAFT_PEER_INVALID');
    const draftId = Number(p.draft_id);
    if (!Number.isInteger(draftId) || draftId === 0) throw bad('draft_id must be non-zero');
    const text = p.text === undefined || p.text === null ? '' : plainText(p.text, p.parse_mode);
    if (text.length > MAX_TEXT) throw bad('message is too long');
    const key = `${token}|${chatKey(chatId)}`;
    if (!state.drafts.has(key)) state.drafts.set(key, []);
    state.drafts.get(key).push({ draft_id: draftId, text, time: Date.now() / 1000 });
    return true;
  },

  answercallbackquery: (token, p) => {
    const cb = state.callbacks.get(String(p.callback_query_id));
    if (!cb || cb.token !== token || cb.answered) {
      throw bad('query is too old and response timeout expired or query ID is invalid');
    }
    if (p.text !== undefined && String(p.text).length > 200) throw bad('MESSAGE_TOO_LONG');
    cb.answered = true;
    cb.answer = {
      text: p.text, show_alert: p.show_alert === true || p.show_alert === 'true',
      url: p.url, cache_time: p.cache_time !== undefined ? Number(p.cache_time) : undefined, time: Date.now() / 1000,
    };
    bumpVersion();
    return true;
  },

  sendchataction: (token, p) => {
    requireChatId(p);
    if (!CHAT_ACTIONS.has(String(p.action))) throw bad('wrong parameter action in request');
    return true;                                      // recorded in the call log (/_calls)
  },

  setmycommands: (token, p) => {
    const commands = parseJsonParam(p.commands, 'commands');
    if (!Array.isArray(commands)) throw bad('parameter "commands" is required');
    if (commands.length > 100) throw bad('BOT_COMMANDS_TOO_MUCH');
    for (const c of commands) {
      if (!c || typeof c.command !== 'string' || !/^[a-z0-9_]{1,32}$/.test(c.command)) throw bad('BOT_COMMAND_INVALID');
      if (typeof c.description !== 'string' || c.description.length < 1 || c.description.length > 256) {
        throw bad('BOT_COMMAND_DESCRIPTION_INVALID');
      }
    }
    state.commands.set(commandsKey(token, p), commands.map((c) => ({ command: c.command, description: c.description })));
    return true;
  },
  getmycommands: (token, p) => state.commands.get(commandsKey(token, p)) || [],
  deletemycommands: (token, p) => { state.commands.delete(commandsKey(token, p)); return true; },

  getupdates: null,                                   // async, see handleGetUpdates

  deletewebhook: (token, p) => {
    tg.deleteWebhook(token);
    if (p.drop_pending_updates === true || p.drop_pending_updates === 'true') state.confirmed.set(token, tg.updateId);
    return true;
  },
  setwebhook: (token, p) => {
    if (!p.url) {                                     // Telegram: empty url = delete
      tg.deleteWebhook(token);
      return true;
    }
    tg.setWebhook({ ...p }, token);
    if (p.drop_pending_updates === true || p.drop_pending_updates === 'true') state.confirmed.set(token, tg.updateId);
    return true;
  },
  getwebhookinfo: (token) => {
    const hook = tg.webhooks[token];
    return {
      url: hook ? hook.url : '', has_custom_certificate: false,
      pending_update_count: pendingUpdates(token).length,
    };
  },

  getchat: (token, p) => {
    const chatId = requireChatId(p);
    if (!state.chats.has(chatKey(chatId))) throw bad('chat not found');
    return { ...chatFor(chatId), accent_color_id: 0, max_reaction_count: 11, accepted_gift_types: {
      unlimited_gifts: false, limited_gifts: false, unique_gifts: false, premium_subscription: false } };
  },

  getfile: (token, p) => {
    const f = state.files.get(String(p.file_id));
    if (!f) throw bad('invalid file_id');
    return { file_id: f.file_id, file_unique_id: f.file_unique_id, file_size: f.bytes.length, file_path: f.file_path };
  },
};

function commandsKey(token, p) {
  const scope = parseJsonParam(p.scope, 'scope') || { type: 'default' };
  return `${token}|${JSON.stringify(scope)}|${p.language_code || ''}`;
}

function sendMedia(token, method, p, parts) {
  const kind = MEDIA_METHODS[method];
  const f = resolveInputFile(p[kind], parts);
  const caption = kind === 'sticker' ? undefined : checkText(p.caption, p.parse_mode, { caption: true });
  const markup = parseReplyMarkup(p.reply_markup);
  const fields = { [kind]: mediaObject(kind, f), reply_markup: markup };
  if (caption !== undefined) fields.caption = caption;
  if (kind === 'sticker' && p.emoji) fields.sticker.emoji = String(p.emoji);
  if (kind === 'document' && p.thumbnail) { /* thumbnails ignored */ }
  // don't hand the file bytes to the package's raw store
  const clean = { ...p };
  delete clean[kind];
  return addBotMessage(token, clean, fields);
}

// ---------------------------------------------------------------- getUpdates (long polling)
const UPDATE_TYPES = ['message', 'edited_message', 'channel_post', 'edited_channel_post', 'callback_query',
  'inline_query', 'chosen_inline_result', 'my_chat_member', 'chat_member', 'message_reaction'];

function pendingUpdates(token, allowed) {
  const floor = state.confirmed.get(token) || 0;
  let list = tg.storage.userMessages
    .filter((u) => u.botToken === token && u.updateId >= floor)
    .sort((a, b) => a.updateId - b.updateId)
    .map((u) => { u.isRead = true; return TelegramServer.formatUpdate(u); });
  if (allowed && allowed.length) {
    list = list.filter((u) => UPDATE_TYPES.some((t) => t in u && allowed.includes(t)));
  }
  return list;
}

async function handleGetUpdates(token, p, res) {
  if (tg.webhooks[token]) {
    throw new ApiError(409, "Conflict: can't use getUpdates method while webhook is active; use deleteWebhook to delete the webhook first");
  }
  let offset = p.offset !== undefined && p.offset !== '' ? Number(p.offset) : undefined;
  const limit = Math.min(Math.max(Number(p.limit) || 100, 1), 100);
  const timeout = Math.min(Math.max(Number(p.timeout) || 0, 0), MAX_POLL_SECONDS);
  const allowed = parseJsonParam(p.allowed_updates, 'allowed updates');
  if (offset !== undefined && offset < 0) {               // -N: only the last N updates
    const all = pendingUpdates(token, allowed);
    offset = all.length >= -offset ? all[all.length + offset].update_id : undefined;
  }
  if (offset !== undefined) {
    state.confirmed.set(token, Math.max(state.confirmed.get(token) || 0, offset));
  }
  // Telegram answers an older, still waiting getUpdates of the same bot with 409.
  const previous = state.pollers.get(token);
  if (previous) previous.conflict();

  let updates = pendingUpdates(token, allowed);
  if (updates.length === 0 && timeout > 0 && !shuttingDown) {
    const outcome = await new Promise((resolve) => {
      let done = false;
      const finish = (why) => {
        if (done) return;
        done = true;
        clearTimeout(timer);
        if (state.pollers.get(token) === poller) state.pollers.delete(token);
        resolve(why);
      };
      const timer = setTimeout(() => finish('timeout'), timeout * 1000);
      const poller = {
        wake: () => { if (pendingUpdates(token, allowed).length) finish('updates'); },
        conflict: () => finish('conflict'),
        stop: () => finish('shutdown'),
      };
      state.pollers.set(token, poller);
      res.on('close', () => finish('closed'));
    });
    if (outcome === 'conflict') {
      throw new ApiError(409, 'Conflict: terminated by other getUpdates request; make sure that only one bot instance is running');
    }
    if (outcome === 'closed') return undefined;
    updates = pendingUpdates(token, allowed);
  }
  return updates.slice(0, limit);
}

// ---------------------------------------------------------------- faults
function takeFault(method, token) {
  const i = state.faults.findIndex((f) => (f.method === '*' || f.method === method)
    && (!f.token || f.token === token) && f.remaining > 0);
  if (i < 0) return undefined;
  const f = state.faults[i];
  f.remaining--;
  if (f.remaining <= 0) state.faults.splice(i, 1);
  return f;
}

function faultDescription(status, retryAfter) {
  switch (status) {
    case 429: return `Too Many Requests: retry after ${retryAfter === undefined ? 1 : retryAfter}`;
    case 400: return 'Bad Request: injected fault';
    case 401: return 'Unauthorized';
    case 403: return 'Forbidden: bot was blocked by the user';
    case 404: return 'Not Found';
    case 409: return 'Conflict: terminated by other getUpdates request; make sure that only one bot instance is running';
    case 502: return 'Bad Gateway';
    default: return status >= 500 ? 'Internal Server Error' : 'Injected fault';
  }
}

// ---------------------------------------------------------------- HTTP plumbing
function sendJson(res, status, body) {
  if (res.writableEnded || res.destroyed) return;
  const data = Buffer.from(JSON.stringify(body));
  res.writeHead(status, { 'Content-Type': 'application/json', 'Content-Length': data.length });
  res.end(data);
}

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    req.on('data', (c) => {
      size += c.length;
      if (size > MAX_BODY_BYTES) { reject(new ApiError(413, 'Request Entity Too Large')); req.destroy(); return; }
      chunks.push(c);
    });
    req.on('end', () => resolve(Buffer.concat(chunks)));
    req.on('error', reject);
  });
}

function parseMultipart(buf, contentType) {
  const m = /boundary=(?:"([^"]+)"|([^;]+))/i.exec(contentType);
  if (!m) throw bad('multipart boundary is missing');
  const boundary = Buffer.from(`--${m[1] || m[2]}`);
  const fields = {};
  let pos = buf.indexOf(boundary);
  while (pos !== -1) {
    pos += boundary.length;
    if (buf[pos] === 0x2d && buf[pos + 1] === 0x2d) break;     // closing "--"
    pos += 2;                                                  // CRLF
    const headerEnd = buf.indexOf('\r\n\r\n', pos);
    if (headerEnd < 0) break;
    const headers = buf.slice(pos, headerEnd).toString('utf8');
    const next = buf.indexOf(Buffer.concat([Buffer.from('\r\n'), boundary]), headerEnd + 4);
    if (next < 0) break;
    const data = buf.slice(headerEnd + 4, next);
    const name = /name="([^"]*)"/i.exec(headers);
    const filename = /filename="([^"]*)"/i.exec(headers);
    const ctype = /content-type:\s*([^\r\n]+)/i.exec(headers);
    if (name) {
      fields[name[1]] = filename
        ? { isFile: true, filename: filename[1], contentType: ctype ? ctype[1].trim() : 'application/octet-stream', data }
        : data.toString('utf8');
    }
    pos = next + 2;
  }
  return fields;
}

async function parseParams(req, url) {
  const params = Object.fromEntries(url.searchParams.entries());
  if (req.method !== 'POST') return params;
  const buf = await readBody(req);
  if (buf.length === 0) return params;
  const ct = String(req.headers['content-type'] || '').toLowerCase();
  if (ct.startsWith('multipart/form-data')) return { ...params, ...parseMultipart(buf, req.headers['content-type']) };
  if (ct.startsWith('application/x-www-form-urlencoded')) {
    return { ...params, ...Object.fromEntries(new URLSearchParams(buf.toString('utf8')).entries()) };
  }
  try {
    return { ...params, ...JSON.parse(buf.toString('utf8')) };
  } catch (e) {
    throw bad('request body is not valid JSON');
  }
}

function logCall(token, method, params, status, description) {
  const clean = {};
  for (const [k, v] of Object.entries(params)) {
    clean[k] = v && typeof v === 'object' && v.isFile ? { file_name: v.filename, size: v.data.length } : v;
  }
  state.calls.push({ seq: ++state.callSeq, time: Date.now() / 1000, token, method, params: clean, status, description });
  if (state.calls.length > 20000) state.calls.splice(0, state.calls.length - 20000);
}

async function handleBotApi(req, res, token, rawMethod, url) {
  const method = rawMethod.toLowerCase();
  let params = {};
  try {
    params = await parseParams(req, url);
    const fault = takeFault(method, token);
    if (fault && fault.delay_ms) await new Promise((r) => setTimeout(r, fault.delay_ms));
    if (fault && fault.drop) {                 // the connection dies before any answer; nothing was done
      logCall(token, rawMethod, params, 0, 'connection dropped (injected fault)');
      req.socket.destroy();
      return undefined;
    }
    if (fault && fault.status) {
      const body = { ok: false, error_code: fault.status, description: fault.description || faultDescription(fault.status, fault.retry_after) };
      if (fault.retry_after !== undefined) body.parameters = { retry_after: fault.retry_after };
      if (fault.migrate_to_chat_id !== undefined) body.parameters = { ...body.parameters, migrate_to_chat_id: fault.migrate_to_chat_id };
      logCall(token, rawMethod, params, fault.status, body.description);
      return sendJson(res, fault.status, body);
    }
    let result;
    if (method === 'getupdates') {
      result = await handleGetUpdates(token, params, res);
      if (result === undefined) return undefined;           // client went away
    } else if (MEDIA_METHODS[method]) {
      result = sendMedia(token, method, params, params);
    } else if (methods[method]) {
      result = methods[method](token, params);
    } else if (NOOP_TRUE_METHODS.has(method)) {
      result = true;
    } else {
      throw new ApiError(404, `Not Found: method ${rawMethod} is not implemented by the Ouroboros emulator`);
    }
    if (method !== 'getupdates' || (result && result.length)) logCall(token, rawMethod, params, 200);
    return sendJson(res, 200, { ok: true, result });
  } catch (e) {
    if (!(e instanceof ApiError)) {
      process.stderr.write(`emulator: ${rawMethod} failed: ${e && e.stack}\n`);
      e = new ApiError(500, `Internal Server Error: ${e && e.message}`);
    }
    logCall(token, rawMethod, params, e.code, e.description);
    const body = { ok: false, error_code: e.code, description: e.description };
    if (e.parameters) body.parameters = e.parameters;
    return sendJson(res, e.code, body);
  }
}

// ---------------------------------------------------------------- user side
function userMessageFromBody(body) {
  const token = body.botToken || body.token;
  if (!token) throw bad('`botToken` is required');
  const message = { ...body };
  delete message.token;
  message.botToken = token;
  if (!message.chat || message.chat.id === undefined) throw bad('`chat` with an `id` is required');
  if (!message.from) throw bad('`from` is required');
  if (!message.chat.type) message.chat = { ...message.chat, type: 'private' };
  if (message.date === undefined) message.date = nowSeconds();
  return { token, message };
}

async function addUserMessage(body, isCommand) {
  const { token, message } = userMessageFromBody(body);
  if (isCommand && !message.entities) {
    const text = String(message.text || '');
    const offset = Math.max(text.indexOf('/'), 0);
    const space = text.indexOf(' ', offset);
    message.entities = [{ offset, length: (space < 0 ? text.length : space) - offset, type: 'bot_command' }];
  }
  const messageId = tg.messageId;
  const updateId = tg.updateId;
  rememberChat(message.chat);
  if (isCommand) await tg.addUserCommand(message); else await tg.addUserMessage(message);
  const stored = { ...message, message_id: messageId };
  delete stored.botToken;
  storeRecord(token, stored, false);
  return { message_id: messageId, update_id: updateId };
}

async function addUserCallback(body) {
  const token = body.botToken || body.token;
  if (!token) throw bad('`botToken` is required');
  if (!body.from) throw bad('`from` is required');
  const ref = body.message || {};
  const chatId = body.chat_id !== undefined ? body.chat_id : (ref.chat && ref.chat.id);
  const messageId = body.message_id !== undefined ? body.message_id : ref.message_id;
  if (chatId === undefined || messageId === undefined) throw bad('`chat_id` and `message_id` of the pressed message are required');
  const rec = state.messages.get(msgKey(token, chatId, messageId));
  if (!rec || rec.deleted) throw bad(`message ${messageId} in chat ${chatId} not found`);
  if (!body.force) {
    const rows = (rec.message.reply_markup && rec.message.reply_markup.inline_keyboard) || [];
    const found = rows.some((row) => row.some((b) => 'callback_data' in b && String(b.callback_data) === String(body.data)));
    if (!found) throw bad(`message ${messageId} has no inline button with callback_data ${JSON.stringify(body.data)}`);
  }
  const callbackId = String(tg.callbackId);
  const updateId = tg.updateId;
  state.callbacks.set(callbackId, { token, chat_id: chatKey(chatId), message_id: Number(messageId), answered: false, answer: undefined, from: body.from, data: body.data });
  await tg.addUserCallback({
    botToken: token,
    from: body.from,
    message: rec.message,
    data: body.data === undefined ? undefined : String(body.data),
    chat_instance: chatInstance(token, chatId),
  });
  return { callback_query_id: callbackId, update_id: updateId };
}

async function addRawUpdate(body) {
  const token = body.botToken || body.token;
  if (!token) throw bad('`botToken` is required');
  const update = { ...(body.update || {}) };
  delete update.update_id;
  const result = { update_id: tg.updateId };
  if (update.message && update.message.message_id === undefined) {
    update.message = { ...update.message, message_id: tg.messageId++ };
    if (update.message.date === undefined) update.message.date = nowSeconds();
  }
  for (const k of ['message', 'edited_message']) {
    const m = update[k];
    if (!m) continue;
    rememberChat(m.chat);
    result.message_id = m.message_id;
    if (k === 'message') storeRecord(token, { ...m }, false);
    else {
      const rec = state.messages.get(msgKey(token, m.chat.id, m.message_id));
      if (rec) { rec.edits.push(rec.message); rec.message = { ...m }; bumpVersion(); }
    }
  }
  await tg.addUserUpdate({ ...tg.getCommonFields(token), rawUpdate: update });
  wakePollers();
  return result;
}

// ---------------------------------------------------------------- test hooks
async function handleTestHook(req, res, url) {
  const path = url.pathname;
  const q = Object.fromEntries(url.searchParams.entries());
  const body = req.method === 'POST' || req.method === 'DELETE' ? await parseParams(req, url) : q;

  if (path === '/_health') return sendJson(res, 200, { ok: true, result: { version: state.version } });

  if (path === '/_faults') {
    if (req.method === 'DELETE' || body.clear) { state.faults = []; return sendJson(res, 200, { ok: true, result: [] }); }
    if (req.method === 'POST') {
      if (!body.method) throw bad('`method` is required ("*" for any)');
      const fault = {
        method: String(body.method).toLowerCase(),
        token: body.token || undefined,
        status: body.status !== undefined ? Number(body.status) : (body.delay_ms || body.drop ? undefined : 429),
        description: body.description,
        retry_after: body.retry_after !== undefined ? Number(body.retry_after) : undefined,
        migrate_to_chat_id: body.migrate_to_chat_id,
        delay_ms: body.delay_ms !== undefined ? Number(body.delay_ms) : undefined,
        drop: body.drop === true || body.drop === 'true',
        remaining: body.count !== undefined ? Number(body.count) : 1,
      };
      if (fault.status === 429 && fault.retry_after === undefined) fault.retry_after = 1;
      state.faults.push(fault);
      return sendJson(res, 200, { ok: true, result: fault });
    }
    return sendJson(res, 200, { ok: true, result: state.faults });
  }

  if (path === '/_messages') {
    const since = q.since_version !== undefined ? Number(q.since_version) : undefined;
    const waitMs = Math.min(Number(q.wait_ms) || 0, 60000);
    if (since !== undefined && state.version <= since && waitMs > 0) {
      await new Promise((resolve) => {
        const done = () => { clearTimeout(t); changeWaiters.delete(done); resolve(); };
        const t = setTimeout(done, waitMs);
        changeWaiters.add(done);
        res.on('close', done);
      });
    }
    const list = [...state.messages.values()]
      .filter((r) => (!q.token || r.token === q.token) && (q.chat_id === undefined || r.chat_id === chatKey(q.chat_id)))
      .sort((a, b) => a.message_id - b.message_id)
      .map(recordView);
    return sendJson(res, 200, { ok: true, version: state.version, result: list });
  }

  if (path === '/_calls') {
    const since = Number(q.since_seq) || 0;
    const list = state.calls.filter((c) => c.seq > since && (!q.token || c.token === q.token)
      && (!q.method || c.method.toLowerCase() === q.method.toLowerCase()));
    return sendJson(res, 200, { ok: true, result: list });
  }

  if (path === '/_callbackAnswers') {
    const list = [...state.callbacks.entries()]
      .filter(([, c]) => !q.token || c.token === q.token)
      .map(([id, c]) => ({ callback_query_id: id, chat_id: chatIdValue(c.chat_id), message_id: c.message_id, data: c.data, answered: c.answered, answer: c.answer }));
    return sendJson(res, 200, { ok: true, result: list });
  }

  if (path === '/_drafts') {
    const result = [...state.drafts.entries()]
      .filter(([k]) => (!q.token || k.startsWith(`${q.token}|`)) && (q.chat_id === undefined || k.endsWith(`|${chatKey(q.chat_id)}`)))
      .flatMap(([k, list]) => list.map((d) => ({ chat_id: chatIdValue(k.split('|').pop()), ...d })));
    return sendJson(res, 200, { ok: true, result });
  }

  if (path === '/_commands') {
    const result = [...state.commands.entries()]
      .filter(([k]) => !q.token || k.startsWith(`${q.token}|`))
      .map(([k, v]) => { const [, scope, lang] = k.split('|'); return { scope: JSON.parse(scope), language_code: lang, commands: v }; });
    return sendJson(res, 200, { ok: true, result });
  }

  if (path === '/_sendUpdate' && req.method === 'POST') {
    return sendJson(res, 200, { ok: true, result: await addRawUpdate(body) });
  }

  if (path === '/_files' && req.method === 'POST') {
    const bytes = Buffer.from(String(body.content_base64 || ''), 'base64');
    const f = storeFile(bytes, body.file_name, body.mime_type);
    return sendJson(res, 200, { ok: true, result: { file_id: f.file_id, file_unique_id: f.file_unique_id, file_size: bytes.length, file_name: f.file_name, mime_type: f.mime_type } });
  }
  if (path.startsWith('/_files/')) {
    const f = state.files.get(decodeURIComponent(path.slice(8)));
    if (!f) return sendJson(res, 404, { ok: false, error_code: 404, description: 'Not Found: no such file' });
    res.writeHead(200, { 'Content-Type': f.mime_type, 'Content-Length': f.bytes.length });
    return res.end(f.bytes);
  }

  if (path === '/_reset' && req.method === 'POST') {
    tg.storage.userMessages = [];
    tg.storage.botMessages = [];
    tg.webhooks = {};
    for (const k of ['chats', 'messages', 'confirmed', 'callbacks', 'commands', 'files', 'drafts']) state[k].clear();
    state.faults = [];
    state.calls = [];
    bumpVersion();
    return sendJson(res, 200, { ok: true, result: true });
  }
  return sendJson(res, 404, { ok: false, error_code: 404, description: `Not Found: ${path}` });
}

// ---------------------------------------------------------------- server
let shuttingDown = false;
const sockets = new Set();

const server = http.createServer(async (req, res) => {
  const url = new URL(req.url, 'http://127.0.0.1');
  const path = url.pathname;
  try {
    let m = /^\/bot([^/]+)\/([A-Za-z_]+)\/?$/.exec(path);
    if (m) return await handleBotApi(req, res, decodeURIComponent(m[1]), m[2], url);

    m = /^\/file\/bot([^/]+)\/(.+)$/.exec(path);
    if (m) {
      const f = [...state.files.values()].find((x) => x.file_path === m[2] || encodeURI(x.file_path) === m[2]
        || decodeURIComponent(m[2]) === decodeURIComponent(x.file_path));
      if (!f) return sendJson(res, 404, { ok: false, error_code: 404, description: 'Not Found' });
      res.writeHead(200, { 'Content-Type': f.mime_type, 'Content-Length': f.bytes.length });
      return res.end(f.bytes);
    }

    if (path.startsWith('/_')) return await handleTestHook(req, res, url);

    if (req.method === 'POST' && (path === '/sendMessage' || path === '/sendCommand' || path === '/sendCallback')) {
      const body = await parseParams(req, url);
      let result;
      if (path === '/sendCallback') result = await addUserCallback(body);
      else result = await addUserMessage(body, path === '/sendCommand');
      return sendJson(res, 200, { ok: true, result });
    }

    // everything else (POST /getUpdates, /getUpdatesHistory) -> the package's express app
    req.body = await parseParams(req, url);
    req._body = true;                          // tell express' body parsers it is already parsed
    return tg.webServer(req, res);
  } catch (e) {
    const err = e instanceof ApiError ? e : new ApiError(500, `Internal Server Error: ${e && e.message}`);
    if (!(e instanceof ApiError)) process.stderr.write(`emulator: ${req.method} ${path} failed: ${e && e.stack}\n`);
    return sendJson(res, err.code, { ok: false, error_code: err.code, description: err.description });
  }
});
server.keepAliveTimeout = 60000;
server.on('connection', (s) => { sockets.add(s); s.on('close', () => sockets.delete(s)); });

function shutdown(code = 0) {
  if (shuttingDown) return;
  shuttingDown = true;
  for (const p of [...state.pollers.values()]) p.stop();
  for (const w of [...changeWaiters]) w();
  server.close(() => process.exit(code));
  setTimeout(() => { for (const s of sockets) s.destroy(); }, 200).unref();
  setTimeout(() => process.exit(code), 2000).unref();
}
process.on('SIGTERM', () => shutdown(0));
process.on('SIGINT', () => shutdown(0));
process.on('unhandledRejection', (e) => process.stderr.write(`emulator: unhandled rejection: ${e && e.stack}\n`));
if (OPTS.exitOnStdinClose) {
  process.stdin.on('end', () => shutdown(0));
  process.stdin.on('error', () => shutdown(0));
  process.stdin.resume();
}

server.listen(OPTS.port, '127.0.0.1', () => {
  const { port } = server.address();
  tg.config.port = port;
  tg.config.apiURL = `http://127.0.0.1:${port}`;
  process.stdout.write(`${JSON.stringify({ ready: true, port })}\n`);
});
server.on('error', (e) => {
  process.stderr.write(`emulator: cannot listen: ${e.message}\n`);
  process.exit(1);
});
