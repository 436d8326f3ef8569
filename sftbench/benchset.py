"""The synthetic 10,000-sample SFT benchmark set (reference JSONL format; the same bytes for the same n and seed).

``write_bench_file(path, n, seed)`` writes it (``python data/make_bench.py`` and ``python -m sftbench.data
make-bench`` call it); the texts mix Chinese and English prose, reviews, classical verse and lists so that the token
length distribution resembles an SFT set, and every record lists its answers best-first.
"""
from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path
from typing import Union

PathLike = Union[str, os.PathLike]

# Phrase banks for the synthetic benchmark file (own vocabulary; the sentences are composed, not quoted).
_ZH_SUBJ = ("我们 这个方法 很多人 研究人员 老师 学生 城市居民 这家公司 政府部门 年轻人 这本书 作者 专家 "
            "家长 用户 医生 工程师 农民 社区 游客 这种现象 传统文化 新技术 市场 历史学家 这座城市").split()
_ZH_VERB = ("需要认真考虑 往往会影响 逐步改变了 可以有效提高 通常忽视了 正在重新理解 不断推动 深刻反映了 "
            "明显降低了 长期关注 进一步完善了 重新定义了 在很大程度上决定了 直接关系到 慢慢适应了").split()
_ZH_OBJ = ("日常生活的节奏 学习效率 产品的质量 社会的发展 人与自然的关系 经济结构 孩子的成长 身体健康 "
           "工作方式 数据安全 城市交通 教育公平 环境保护 消费习惯 文化传承 科学研究的方向 团队合作 "
           "信息传播的速度 乡村振兴 能源利用效率 心理状态 阅读习惯").split()
_ZH_CONN = ("首先， 其次， 此外， 同时， 另一方面， 总的来说， 因此， 不过， 事实上， 一般来说， 值得注意的是， "
            "换句话说， 更重要的是， 从长远来看， 在实际操作中，").split()
_ZH_TAIL = ("这一点非常重要 这需要时间和耐心 效果因人而异 具体情况还要具体分析 很多细节值得推敲 "
            "这并不是一件容易的事 大家应当理性看待 这也是经验的积累 其中的道理并不复杂 需要长期坚持").split()
_ZH_TOPIC = ("人工智能 气候变化 中医养生 城市规划 家庭教育 网络安全 古代诗歌 健康饮食 宇宙探索 "
             "职场沟通 旅行攻略 理财规划 体育锻炼 新能源汽车 传统节日 心理健康 编程学习 摄影技巧").split()
_ZH_ASPECT = "基本原理 主要优点 常见误区 发展历史 未来趋势 入门方法 核心概念 实际应用".split()
_ZH_ITEM = ("这款手机 这家餐厅 这部电影 这本小说 这家酒店 这款耳机 这台笔记本电脑 这次旅行 这门课程 "
            "这款洗发水 这家咖啡店 这双跑鞋").split()
_ZH_OPINION = ("质量很不错 性价比很高 服务态度热情 环境干净整洁 物流速度很快 包装有点简陋 味道一般 "
               "做工精细 续航时间比较短 剧情紧凑 价格偏贵 细节处理得很好 值得再来一次 没有想象中那么好 "
               "客服回复及时 音质清晰 画面非常精美 用起来很顺手").split()
_ZH_CHARS = ("春风秋月山水云天花鸟江河日夜雪雨松竹梅兰青白红金门窗楼台古今人家心意千万一三五长远高低"
             "清明新旧星光柳烟霜露书琴诗酒茶香梦舟桥林泉石草木归来去飞流落")
_ZH_CLASSICAL = ("学而时习之 温故而知新 三人行必有我师焉 知之为知之 不知为不知 吾日三省吾身 "
                 "己所不欲勿施于人 逝者如斯夫 不舍昼夜 君子坦荡荡 小人长戚戚 敏而好学 不耻下问 "
                 "业精于勤荒于嬉 行成于思毁于随 锲而不舍 金石可镂 博学之 审问之 慎思之 明辨之 笃行之 "
                 "天行健 君子以自强不息 地势坤 君子以厚德载物 学不可以已 青取之于蓝而青于蓝").split()
_EN_SUBJ = ("the system|many developers|the city council|a good teacher|most users|the research team|this approach|"
            "our company|young people|the new policy|a careful reader|the model|every student|the market").split("|")
_EN_VERB = ("usually improves|can slowly change|depends heavily on|has a strong effect on|often ignores|"
            "is closely related to|helps to explain|tries to balance|was designed to reduce|keeps track of").split("|")
_EN_OBJ = ("the quality of the results|daily routines|the cost of living|public transport|long-term memory|"
           "the speed of the network|how people learn new skills|energy consumption|the reading experience|"
           "data privacy|the structure of the code|team communication|the local economy").split("|")
_EN_CONN = "First,|In addition,|However,|For example,|In practice,|As a result,|On the other hand,|Finally,".split("|")
_EN_TOPIC = ("machine learning|climate change|healthy eating|learning to code|public speaking|saving money|"
             "traveling on a budget|time management|ancient history|photography").split("|")


def _lognormal_int(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    return max(lo, min(hi, int(round(rng.lognormvariate(math.log(median), sigma)))))


def _zh_sentence(rng: random.Random) -> str:
    s = f"{rng.choice(_ZH_SUBJ)}{rng.choice(_ZH_VERB)}{rng.choice(_ZH_OBJ)}"
    r = rng.random()
    if r < 0.35:
        s = rng.choice(_ZH_CONN) + s
    if r > 0.6:
        s += "，" + rng.choice(_ZH_TAIL)
    return s + rng.choice("。。。！；")


def _zh_text(rng: random.Random, n_sent: int) -> str:
    return "".join(_zh_sentence(rng) for _ in range(n_sent))


def _en_text(rng: random.Random, n_sent: int) -> str:
    out = []
    for _ in range(n_sent):
        s = f"{rng.choice(_EN_SUBJ)} {rng.choice(_EN_VERB)} {rng.choice(_EN_OBJ)}"
        if rng.random() < 0.4:
            s = f"{rng.choice(_EN_CONN)} {s}"
        out.append(s[0].upper() + s[1:] + rng.choice(".!."))
    return " ".join(out)


def _verse(rng: random.Random, width: int) -> str:
    return "".join(rng.choice(_ZH_CHARS) for _ in range(width))


def _bench_record(rng: random.Random) -> dict:
    kind = rng.choices(("qa_zh", "comment", "couplet", "poem", "classical", "qa_en", "essay"),
                       weights=(34, 15, 11, 11, 10, 10, 9))[0]
    prefix = ""
    if kind == "qa_zh":
        topic = rng.choice(_ZH_TOPIC)
        q = rng.choice((f"{topic}的{rng.choice(_ZH_ASPECT)}是什么？", f"如何理解{topic}？",
                        f"关于{topic}，{rng.choice(_ZH_SUBJ)}应该注意什么？", f"为什么说{topic}很重要？"))
        ctx = _zh_text(rng, _lognormal_int(rng, 2.0, 1.0, 0, 30)) if rng.random() < 0.5 else ""
        prompt = ctx + q
        answer = _zh_text(rng, _lognormal_int(rng, 17, 0.62, 1, 150))
        prefix = rng.choice(("", "", "回答："))
    elif kind == "comment":
        item = rng.choice(_ZH_ITEM)
        prompt = rng.choice((f"请写一段关于{item}的评论。", f"{item}怎么样？", f"评论：{item}"))
        parts = [f"{item}{rng.choice(_ZH_OPINION)}" for _ in range(_lognormal_int(rng, 2, 0.6, 1, 8))]
        answer = "，".join(parts) + "。" + _zh_text(rng, _lognormal_int(rng, 8, 0.8, 0, 60))
        prefix = rng.choice(("", "评论："))
    elif kind == "couplet":
        w = rng.choice((5, 7, 7, 9))
        prompt = f"对对联。上联：{_verse(rng, w)}"
        answer = _verse(rng, w)
        prefix = "下联："
    elif kind == "poem":
        w, lines = rng.choice((5, 7)), rng.choice((4, 4, 8))
        topic = rng.choice(_ZH_TOPIC[:6] + ['春天', '故乡', '明月', '离别'])
        prompt = f"以{topic}为题，写一首{'五' if w == 5 else '七'}言诗。"
        answer = "".join(_verse(rng, w) + ("，" if i % 2 == 0 else "。") for i in range(lines))
        prefix = rng.choice(("", "诗："))
    elif kind == "classical":
        src = "，".join(rng.choice(_ZH_CLASSICAL) for _ in range(_lognormal_int(rng, 4, 0.6, 1, 20))) + "。"
        prompt = f"将下面的文言文翻译成现代汉语：{src}"
        answer = _zh_text(rng, _lognormal_int(rng, 14, 0.7, 1, 120))
        prefix = rng.choice(("", "译文："))
    elif kind == "qa_en":
        topic = rng.choice(_EN_TOPIC)
        prompt = rng.choice((f"What should a beginner know about {topic}?", f"Explain {topic} in simple terms.",
                             f"Why does {topic} matter?"))
        answer = _en_text(rng, _lognormal_int(rng, 14, 0.7, 1, 100))
    else:  # essay: the long tail that gets truncated
        topic = rng.choice(_ZH_TOPIC)
        prompt = f"写一篇关于{topic}的文章，" + rng.choice(("不少于五百字。", "要求结构清晰。", "可以举例说明。"))
        answer = _zh_text(rng, _lognormal_int(rng, 36, 0.4, 8, 200))
    n_ans = rng.choice((1, 1, 2, 3))
    scores = sorted((rng.randint(0, 10) for _ in range(n_ans)), reverse=True)
    answers = [{"answer": answer, "score": scores[0]}]
    for s in scores[1:]:  # worse answers: shorter, listed after the best one
        alt = _en_text(rng, 2) if kind == "qa_en" else _zh_text(rng, rng.randint(1, 3))
        answers.append({"answer": alt, "score": s})
    return {"prompt": prompt, "answers": answers, "prefix": prefix}


def write_bench_file(path: PathLike, n: int = 10000, seed: int = 0) -> Path:
    """Write the synthetic SFT benchmark set (reference format, same bytes for the same n and seed)."""
    rng = random.Random(f"sftbench-bench:{int(seed)}")
    lines = [json.dumps(_bench_record(rng), ensure_ascii=False, separators=(", ", ": ")) for _ in range(int(n))]
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.{os.getpid()}")
    tmp.write_bytes(("\n".join(lines) + "\n").encode("utf-8"))
    os.replace(tmp, out)
    return out


