"""The words the evals look for, per language: a history in French is judged in French.

ASSISTANT_VOICE: phrases of the corporate/assistant voice the style-drift eval counts ("I'd be
happy to", "As an AI", …), as regular expressions matched case-insensitively, a
' matching a typed ' or ’. SPEAKER_LABELS:
names of a speaker that, at the start of a line followed by ":", show a reply writing the other
side of the conversation (the format eval). A language is covered by a check when it has an
entry here; memory/language.py reports the stored history's languages that are not.
"""

from __future__ import annotations

ASSISTANT_VOICE: dict[str, list[str]] = {
    "en": [
        r"\bI'?d be (?:happy|glad) to\b", r"\bas an? (?:ai|chatbot|assistant|language model)\b",
        r"\bI'?m sorry for (?:any|the) (?:misunderstanding|confusion|inconvenience)\b", r"\bI'?m sorry to hear\b",
        r"\blanguage model\b", r"\bhow can I (?:help|assist)\b",
        r"\bI'?m (?:just )?an? (?:ai|assistant|chatbot|virtual assistant)\b",
        r"\bI (?:do not|don't) have (?:personal )?(?:feelings|emotions|opinions)\b", r"\bI apologi[sz]e\b",
        r"\bfeel free to\b", r"\bI'?m here to (?:help|assist)\b", r"\bcertainly!", r"\bgreat question\b",
        r"\bI hope this helps\b", r"\bplease note that\b", r"\bit'?s important to (?:note|remember)\b",
    ],
    "fr": [
        r"\bje serais (?:ravie?|heureux|heureuse|content|contente) de\b",
        r"\ben tant qu'(?:ia|intelligence artificielle|assistante?|modèle de langage)\b", r"\bmodèle de langage\b",
        r"\bje suis (?:vraiment )?désolée? d(?:e |')(?:apprendre|entendre)\b", r"\bcomment puis-je (?:vous |t')?aider\b",
        r"\bje (?:ne )?suis (?:qu'|juste |simplement )?une? (?:ia|assistante?|intelligence artificielle|chatbot)\b",
        r"\bje n'ai pas de (?:sentiments|émotions|opinions)\b", r"\bn'hésitez pas à\b",
        r"\bje suis là pour (?:vous |t')?aider\b", r"\bj'espère que cela (?:vous |t')?aide\b",
        r"\bil est important de (?:noter|souligner|rappeler)\b", r"\bexcellente question\b",
        r"\bje (?:m'excuse|vous prie de m'excuser)\b",
    ],
    "de": [
        r"\b(?:ich helfe (?:ihnen|dir) gerne?|gerne? helfe ich)\b", r"\bals (?:ki|künstliche intelligenz|"
        r"sprachmodell|assistent|assistentin|chatbot)\b", r"\bsprachmodell\b",
        r"\bes tut mir leid,? (?:das|dies) zu hören\b", r"\bwie kann ich (?:ihnen|dir) (?:helfen|behilflich sein)\b",
        r"\bich bin (?:nur )?(?:eine ki|ein assistent|eine assistentin|ein chatbot|ein sprachmodell)\b",
        r"\bich habe keine (?:gefühle|emotionen|persönlichen meinungen|eigene meinung)\b",
        r"\bzögern sie nicht\b", r"\bich hoffe,? (?:das|dies) hilft\b",
        r"\bes ist wichtig,? zu (?:beachten|bedenken|erwähnen)\b", r"\bgute frage\b", r"\bich entschuldige mich\b",
    ],
    "es": [
        r"\bestaré (?:encantad[oa]|feliz) de\b", r"\bcon gusto te ayudo\b",
        r"\bcomo (?:una )?(?:ia|inteligencia artificial|modelo de lenguaje)\b", r"\bmodelo de lenguaje\b",
        r"\b(?:lamento|siento mucho) (?:escuchar|oír|saber) (?:eso|esto)\b",
        r"\ben qué (?:te |le )?puedo ayudar\b", r"\bcómo puedo (?:ayudarte|ayudarle)\b",
        r"\bsoy (?:solo |sólo )?una? (?:ia|asistente|inteligencia artificial|chatbot)\b",
        r"\bno tengo (?:sentimientos|emociones|opiniones personales)\b", r"\bno dudes? en\b",
        r"\bestoy aquí para ayudar(?:te|le)?\b", r"\bespero que (?:esto )?(?:te |le )?(?:ayude|sirva)\b",
        r"\bes importante (?:tener en cuenta|señalar|recordar|destacar)\b", r"\bexcelente pregunta\b",
        r"\b(?:me disculpo|pido disculpas)\b",
    ],
    "pt": [
        r"\b(?:ficarei|fico) (?:feliz|contente) em ajudar\b", r"\bterei (?:todo )?o (?:maior )?prazer em\b",
        r"\bcomo (?:uma )?(?:ia|inteligência artificial|modelo de linguagem)\b",
        r"\bmodelo de linguagem\b", r"\b(?:lamento|sinto muito) (?:ouvir|saber|em saber) (?:isso|disso)\b",
        r"\bcomo posso (?:te |lhe )?ajudar\b", r"\bem que posso (?:te |lhe )?ajudar\b",
        r"\b(?:eu )?sou (?:apenas |só )?uma? (?:ia|assistente|inteligência artificial|chatbot)\b",
        r"\bnão tenho (?:sentimentos|emoções|opiniões pessoais)\b",
        r"\b(?:fique|sinta-se) à vontade para\b", r"\bestou aqui para (?:te |lhe )?ajudar\b",
        r"\bespero que isso (?:te |lhe )?ajude\b", r"\bé importante (?:notar|lembrar|observar|destacar)\b",
        r"\bótima pergunta\b", r"\bpeço desculpas\b",
    ],
    "ru": [
        r"\b(?:буду рада?|рада?) помочь\b", r"\bс радостью помогу\b",
        r"\bкак (?:ии|искусственный интеллект|языковая модель)\b",
        r"\bязыковая модель\b", r"\bмне (?:очень )?жаль это слышать\b", r"\bчем (?:я )?могу (?:вам |тебе )?помочь\b",
        r"\bя (?:всего лишь |просто |лишь )?(?:ии|ассистент|искусственный интеллект|виртуальный помощник|"
        r"языковая модель|чат-бот)\b",
        r"\bу меня нет (?:чувств|эмоций|личного мнения|собственного мнения)\b", r"\bне стесняйтесь\b",
        r"\bя здесь,? чтобы (?:вам |тебе )?помочь\b", r"\bнадеюсь,? (?:это|мой ответ) (?:вам |тебе )?поможет\b",
        r"\bважно (?:отметить|помнить|учитывать)\b", r"\bотличный вопрос\b", r"\bприношу (?:свои )?извинения\b",
    ],
}

SPEAKER_LABELS: dict[str, list[str]] = {
    "en": ["user", "human", "me", "you", "assistant", "system", "bot"],
    "fr": ["utilisateur", "utilisatrice", "humain", "moi", "toi", "vous", "assistant", "assistante", "système"],
    "de": ["benutzer", "nutzer", "nutzerin", "mensch", "ich", "du", "assistent", "assistentin", "system"],
    "es": ["usuario", "usuaria", "humano", "yo", "tú", "tu", "usted", "asistente", "sistema"],
    "pt": ["usuário", "usuária", "utilizador", "humano", "eu", "você", "tu", "assistente", "sistema"],
    "ru": ["пользователь", "человек", "я", "ты", "вы", "ассистент", "помощник", "бот", "система"],
}
