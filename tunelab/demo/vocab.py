"""The vocabulary and note templates behind the synthetic clinical-note task, in three disjoint pools.

Pool A feeds the train split, pool C only the validation split, pool B only the test split: different diagnoses
and ICD-10 codes, different complaint and plan phrases, and different sentence templates. A model that scores well
on validation or test has therefore learned the extraction *behaviour* (copy the complaint, the diagnosis names,
the plan and the codes into the schema), not strings it saw in training, and validation -- where a recipe is
chosen -- is held out from training exactly as test is. Data only; `clinical.py` does the generating.

Placeholders: {demo} demographics, {cc} chief complaint, {dur} duration, {dx} rendered diagnoses (names with
codes), {plan} plan phrase; in demographics {age}, {s} (M/F), {sex} (male/female), {person} (man/woman); in
durations {n} (days) and {w} (weeks); in extras {sbp} {dbp} {hr} {pmh}.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Case:
    """One diagnosis with the complaints that bring a patient in for it and the plans a physician writes."""

    diagnosis: str
    code: str
    complaints: tuple[str, ...]
    plans: tuple[str, ...]
    # Chronic conditions may also appear as a second, comorbid diagnosis in another case's note.
    chronic: bool = False
    # "M" or "F" for conditions of one sex (BPH, vaginitis); None for either.
    sex: str | None = None


@dataclass(frozen=True)
class Pool:
    name: str
    cases: tuple[Case, ...]
    demographics: tuple[str, ...]
    durations: tuple[str, ...]
    openers: tuple[str, ...]
    extras: tuple[str, ...]
    dx_sentences: tuple[str, ...]
    code_styles: tuple[str, ...]
    dx_joiners: tuple[str, ...]
    plan_sentences: tuple[str, ...]
    follow_ups: tuple[str, ...]
    one_liners: tuple[str, ...]

    @property
    def templates(self) -> tuple[str, ...]:
        """Every sentence-level template of this pool (used to check the pools share none)."""
        return self.openers + self.extras + self.dx_sentences + self.plan_sentences + self.one_liners


# Past history is background noise the model must learn to ignore; it names no coded diagnosis, so both pools
# may share it.
PMH = (
    "s/p appendectomy",
    "s/p cholecystectomy",
    "noncontributory",
    "former smoker, 10 pk-yr",
    "s/p tonsillectomy",
    "s/p hernia repair",
)

POOL_A = Pool(
    name="A",
    cases=(
        Case("essential hypertension", "I10", ("headache", "elevated BP readings at home"),
             ("start lisinopril 10 mg PO q.d.", "HCTZ 12.5 mg PO q.d., low-sodium diet"), chronic=True),
        Case("type 2 diabetes mellitus without complications", "E11.9", ("polyuria and polydipsia", "increased thirst"),
             ("start metformin 500 mg PO b.i.d., HbA1c in 3 mo", "metformin 500 mg PO q.d., diabetic diet education"),
             chronic=True),
        Case("acute bronchitis", "J20.9", ("productive cough", "cough with yellow sputum"),
             ("supportive care, benzonatate 100 mg PO t.i.d. PRN", "albuterol MDI 2 puffs q4-6h PRN, fluids")),
        Case("acute pharyngitis", "J02.9", ("sore throat", "painful swallowing"),
             ("rapid strep test, saltwater gargles", "ibuprofen 400 mg PO q6h PRN, throat lozenges")),
        Case("acute maxillary sinusitis", "J01.00", ("facial pain and congestion", "sinus pressure"),
             ("amoxicillin-clavulanate 875 mg PO b.i.d. x7d, saline rinses", "fluticasone nasal spray q.d., saline irrigation")),
        Case("urinary tract infection", "N39.0", ("dysuria", "burning with urination"),
             ("nitrofurantoin 100 mg PO b.i.d. x5d, UA w/ culture", "UA w/ reflex culture, push fluids")),
        Case("low back pain", "M54.50", ("LBP after lifting", "lower back pain"),
             ("naproxen 500 mg PO b.i.d. PRN, PT referral", "heat, stretching, cyclobenzaprine 5 mg PO qhs PRN")),
        Case("migraine without aura", "G43.009", ("throbbing headache", "unilateral headache with photophobia"),
             ("sumatriptan 50 mg PO PRN, headache diary", "rizatriptan 10 mg PO PRN, limit caffeine")),
        Case("gastroesophageal reflux disease", "K21.9", ("heartburn", "burning epigastric pain after meals"),
             ("omeprazole 20 mg PO q.d. x8 wks", "famotidine 20 mg PO b.i.d., avoid late meals"), chronic=True),
        Case("allergic rhinitis", "J30.9", ("sneezing and runny nose", "itchy watery eyes"),
             ("cetirizine 10 mg PO q.d.", "fluticasone 50 mcg 2 sprays each nostril q.d."), chronic=True),
        Case("iron deficiency anemia", "D50.9", ("easy fatigability and pallor", "fatigue"),
             ("ferrous sulfate 325 mg PO q.d., CBC in 4 wks", "iron studies, ferrous sulfate 325 mg PO q.o.d.")),
        Case("hypothyroidism", "E03.9", ("weight gain and cold intolerance", "hair thinning and constipation"),
             ("levothyroxine 50 mcg PO q.d., TSH in 6 wks", "TSH and free T4, start levothyroxine 25 mcg PO q.d."),
             chronic=True),
        Case("major depressive disorder, single episode, moderate", "F32.1", ("low mood and anhedonia", "poor sleep and low energy"),
             ("start sertraline 50 mg PO q.d., therapy referral", "PHQ-9 today, start fluoxetine 20 mg PO q.d.")),
        Case("generalized anxiety disorder", "F41.1", ("excessive worry", "restlessness and muscle tension"),
             ("start escitalopram 10 mg PO q.d., CBT referral", "buspirone 5 mg PO b.i.d., counseling"), chronic=True),
        Case("otitis media, right ear", "H66.91", ("R ear pain", "right ear pain and fever"),
             ("amoxicillin 500 mg PO t.i.d. x10d, acetaminophen PRN", "watchful waiting 48h, ibuprofen PRN")),
        Case("pneumonia, unspecified organism", "J18.9", ("fever and productive cough", "cough, fever and SOB"),
             ("CXR, azithromycin 500 mg PO day 1 then 250 mg q.d. x4d", "doxycycline 100 mg PO b.i.d. x7d, CXR")),
        Case("mild intermittent asthma", "J45.20", ("wheezing", "SOB with exercise"),
             ("albuterol HFA 2 puffs q4h PRN, asthma action plan", "albuterol MDI PRN, spirometry"), chronic=True),
        Case("gout", "M10.9", ("R great toe pain and swelling", "L great toe pain"),
             ("colchicine 0.6 mg PO b.i.d., check uric acid", "indomethacin 50 mg PO t.i.d. x3d, limit alcohol")),
        Case("gastroenteritis", "K52.9", ("N/V/D", "nausea, vomiting and diarrhea"),
             ("oral rehydration, ondansetron 4 mg PO q8h PRN", "BRAT diet, ondansetron ODT 4 mg PRN")),
        Case("conjunctivitis", "H10.9", ("red itchy eye", "eye redness with discharge"),
             ("erythromycin ophthalmic ointment q.i.d. x5d", "cool compresses, artificial tears PRN")),
        Case("cellulitis of left lower limb", "L03.116", ("L leg redness and swelling", "warm red rash on L shin"),
             ("cephalexin 500 mg PO q.i.d. x7d, mark borders", "cephalexin 500 mg PO q.i.d., elevate leg")),
        Case("hyperlipidemia", "E78.5", ("abnormal lipid panel", "high cholesterol on labs"),
             ("start atorvastatin 20 mg PO qhs, lipids in 12 wks", "TLC diet, atorvastatin 10 mg PO q.d."), chronic=True),
        Case("insomnia", "G47.00", ("difficulty sleeping", "trouble falling asleep"),
             ("sleep hygiene counseling, melatonin 3 mg PO qhs PRN", "CBT-I referral, trazodone 50 mg PO qhs PRN")),
        Case("constipation", "K59.00", ("infrequent hard stools", "straining with BMs"),
             ("polyethylene glycol 17 g PO q.d., increase fiber", "docusate 100 mg PO b.i.d., fluids")),
        Case("sprain of right ankle, initial encounter", "S93.401A", ("R ankle pain after inversion injury", "R ankle swelling"),
             ("RICE, ankle brace, ibuprofen 600 mg PO t.i.d. PRN", "ankle x-ray, crutches, RICE")),
        Case("vitamin D deficiency", "E55.9", ("diffuse bone aches", "generalized aches"),
             ("vitamin D3 2000 IU PO q.d.", "ergocalciferol 50,000 IU PO weekly x8 wks"), chronic=True),
        Case("atrial fibrillation", "I48.91", ("irregular heartbeat", "palpitations and lightheadedness"),
             ("ECG, start metoprolol 25 mg PO b.i.d., cardiology referral", "TSH, echo, apixaban 5 mg PO b.i.d.")),
        Case("COPD with acute exacerbation", "J44.1", ("increased sputum and DOE", "worsening SOB"),
             ("prednisone 40 mg PO q.d. x5d, tiotropium inhaler", "nebulized albuterol, prednisone 40 mg PO q.d.")),
        Case("benign prostatic hyperplasia with LUTS", "N40.1", ("urinary frequency and nocturia", "weak urinary stream"),
             ("tamsulosin 0.4 mg PO qhs", "PSA, start finasteride 5 mg PO q.d."), chronic=True, sex="M"),
        Case("tension-type headache", "G44.209", ("band-like headache", "bilateral pressure headache"),
             ("acetaminophen 500 mg PO q6h PRN, stress reduction", "ibuprofen 400 mg PO PRN, posture exercises")),
        Case("contact dermatitis", "L25.9", ("itchy rash on hands", "red itchy rash on forearm"),
             ("triamcinolone 0.1% cream b.i.d. x2 wks, avoid irritants", "hydrocortisone 1% cream b.i.d., emollients")),
        Case("viral upper respiratory infection", "J06.9", ("runny nose and congestion", "stuffy nose and mild cough"),
             ("supportive care, fluids, rest", "saline spray, acetaminophen PRN")),
    ),
    demographics=("{age}{s}", "{age} y/o {s}", "{age}yo {sex}", "{age}{s} pt", "{sex} {age}y"),
    durations=("x{n}d", "x {n} days", "for {n} days", "x{w} wks", "x{n} dys", "for {w} wks", "x {w} weeks",
               "since {n} days", "for {w} weeks now", "that began {n} days ago", "{n} days' history", "for a few days",
               "x ~{w} wks", "for {n}+ days"),
    openers=(
        "{demo} c/o {cc} {dur}.",
        "Pt c/o {cc} {dur}.",
        "{demo} presents with {cc} {dur}.",
        "CC: {cc} {dur}.",
        "{demo} w/ {cc} {dur}.",
        "{demo} comes in c/o {cc} {dur}.",
        "Subjective: {demo}, {cc} {dur}.",
    ),
    extras=(
        "Denies fever/chills.",
        "Vitals: BP {sbp}/{dbp}, HR {hr}.",
        "PMH: {pmh}.",
        "NKDA.",
        "Exam otherwise WNL.",
        "HR {hr}, BP {sbp}/{dbp}, T 98.6.",
        "Meds: none.",
    ),
    dx_sentences=("Dx: {dx}.", "A: {dx}.", "Assessment: {dx}.", "Likely {dx}.", "Suspect {dx}.", "A/P: {dx}.",
                  "Dx is {dx}."),
    # Codes come bare and behind assorted labels, so the model learns to copy the code alone.
    code_styles=("{name} ({code})", "{name}, {code}", "{name}, code {code}", "{name} (ICD {code})",
                 "{name} - {code}", "{name} [ICD10: {code}]", "{name} (code: {code})", "{name} -- {code}"),
    dx_joiners=("; ", " and ", " & ", "; also ", ", and "),
    plan_sentences=("Plan: {plan}.", "P: {plan}.", "Plan - {plan}.", "Orders: {plan}.", "Will do {plan}."),
    follow_ups=(", f/u {w} wks", ", RTC PRN", ", f/u {n}d", ", f/u in {n} days", ", next visit {w} wks"),
    one_liners=(
        "{demo} c/o {cc} {dur}; dx {dx}; plan {plan}.",
        "Pt w/ {cc} {dur}, dx {dx}, plan: {plan}.",
        "{demo}: {cc} {dur} | {dx} | {plan}.",
    ),
)

POOL_B = Pool(
    name="B",
    cases=(
        Case("acute cystitis without hematuria", "N30.00", ("suprapubic pain and urgency", "urinary urgency"),
             ("trimethoprim-sulfamethoxazole DS 1 tab PO b.i.d. x3d", "fosfomycin 3 g PO once, urine culture")),
        Case("acute vaginitis", "N76.0", ("vaginal discharge with odor", "vaginal itching"),
             ("metronidazole 500 mg PO b.i.d. x7d", "wet mount, clindamycin vaginal cream qhs x7d"), sex="F"),
        Case("plantar fasciitis", "M72.2", ("heel pain worse in the morning", "L heel pain"),
             ("night splint, calf stretches", "heel cups, naproxen 500 mg PO b.i.d. PRN")),
        Case("otitis externa, left ear", "H60.92", ("L ear itching and drainage", "left ear canal pain"),
             ("ciprofloxacin-dexamethasone otic 4 drops b.i.d. x7d", "ofloxacin otic 10 drops q.d., keep ear dry")),
        Case("herpes zoster without complications", "B02.9", ("painful vesicular rash on flank", "burning band of blisters"),
             ("valacyclovir 1 g PO t.i.d. x7d", "acyclovir 800 mg PO 5x daily, gabapentin 300 mg qhs")),
        Case("gastric ulcer", "K25.9", ("gnawing epigastric pain", "dark tarry stools"),
             ("pantoprazole 40 mg PO q.d., H. pylori breath test", "stop NSAIDs, EGD referral")),
        Case("carpal tunnel syndrome, right upper limb", "G56.01", ("numbness in R hand at night", "tingling in R fingers"),
             ("wrist splint qhs, EMG referral", "neutral wrist splint, hand surgery consult")),
        Case("obstructive sleep apnea", "G47.33", ("loud snoring and daytime sleepiness", "witnessed apneas"),
             ("polysomnography, weight loss counseling", "home sleep study, CPAP titration"), chronic=True),
        Case("chronic kidney disease, stage 3a", "N18.31", ("elevated creatinine on labs", "foamy urine"),
             ("renal panel, nephrology referral", "avoid NSAIDs, urine albumin-to-creatinine ratio"), chronic=True),
        Case("tinea pedis", "B35.3", ("itchy peeling skin between toes", "cracked skin on soles"),
             ("terbinafine 1% cream b.i.d. x2 wks", "clotrimazole 1% cream b.i.d., dry socks")),
        Case("calculus of kidney", "N20.0", ("colicky flank pain", "R flank pain with hematuria"),
             ("ketorolac 10 mg PO q6h PRN, strain urine", "CT abd/pelvis, oral hydration")),
        Case("hypokalemia", "E87.6", ("muscle cramps and weakness", "leg cramps"),
             ("potassium chloride 20 mEq PO q.d., repeat BMP in 1 wk", "KCl 40 mEq PO once, check magnesium")),
        Case("rosacea", "L71.9", ("facial flushing and redness", "red bumps on cheeks"),
             ("metronidazole 0.75% gel q.d.", "azelaic acid 15% gel b.i.d., sunscreen"), chronic=True),
        Case("primary osteoarthritis, right knee", "M17.11", ("R knee pain with stiffness", "right knee crepitus"),
             ("diclofenac 1% gel q.i.d., quad strengthening", "intra-articular steroid injection, cane"), chronic=True),
        Case("benign paroxysmal positional vertigo", "H81.10", ("dizziness when rolling over in bed", "room-spinning dizziness"),
             ("Epley maneuver in clinic, meclizine 25 mg PO q8h PRN", "vestibular rehab, fall precautions")),
        Case("influenza", "J11.1", ("fever, myalgias and dry cough", "body aches and chills"),
             ("oseltamivir 75 mg PO b.i.d. x5d", "rest, fluids, oseltamivir 75 mg PO b.i.d.")),
        Case("acne vulgaris", "L70.0", ("pimples on face and back", "comedones on forehead"),
             ("benzoyl peroxide 5% wash b.i.d., adapalene 0.1% gel qhs", "doxycycline 100 mg PO q.d., topical retinoid")),
        Case("hemorrhoids", "K64.9", ("rectal bleeding with BMs", "anal itching and swelling"),
             ("sitz baths, hydrocortisone rectal cream b.i.d.", "fiber supplement, witch hazel pads")),
        Case("lateral epicondylitis, left elbow", "M77.12", ("L elbow pain with gripping", "lateral elbow pain"),
             ("counterforce brace, ice", "eccentric exercises, topical diclofenac")),
        Case("pure hypercholesterolemia", "E78.00", ("high LDL on screening labs", "LDL of 190"),
             ("rosuvastatin 10 mg PO q.d., recheck lipids in 3 mo", "ezetimibe 10 mg PO q.d., Mediterranean diet"),
             chronic=True),
        Case("prediabetes", "R73.03", ("elevated A1c on screening", "borderline fasting glucose"),
             ("lifestyle modification, repeat HbA1c in 6 mo", "DPP referral, 150 min/wk exercise"), chronic=True),
        Case("panic disorder", "F41.0", ("episodes of racing heart and fear", "sudden attacks of dread"),
             ("start paroxetine 10 mg PO q.d., psychotherapy referral", "hydroxyzine 25 mg PO PRN, CBT")),
        Case("obesity", "E66.9", ("wants help losing weight", "BMI 34"),
             ("nutrition referral, 5% weight loss goal", "phentermine 37.5 mg PO q.a.m., diet log"), chronic=True),
        Case("tobacco use", "Z72.0", ("wants to quit smoking", "smoking cessation visit"),
             ("nicotine patch 21 mg/24 h q.d., quitline referral", "varenicline 0.5 mg PO q.d. titrate")),
    ),
    demographics=("{age}-year-old {person}", "{age} yo {s}", "{age} year old {sex}", "{person} aged {age}"),
    durations=("for the past {n} days", "over the last {w} weeks", "since yesterday", "for about {w} weeks"),
    openers=(
        "{demo} seen today for {cc} {dur}.",
        "Reason for visit: {cc} {dur}.",
        "{demo} reports {cc} {dur}.",
        "{demo} complaining of {cc} {dur}.",
        "Presenting problem: {cc}, {dur}.",
    ),
    extras=(
        "No fevers or night sweats.",
        "BP {sbp}/{dbp}, P {hr}, afebrile.",
        "Hx: {pmh}.",
        "Allergies: none known.",
        "Remainder of exam unremarkable.",
    ),
    dx_sentences=("Impression: {dx}.", "Consistent with {dx}.", "Diagnosed with {dx}.", "Working diagnosis: {dx}."),
    code_styles=("{name} [{code}]", "{name} (ICD-10 {code})"),
    dx_joiners=(", ", " plus "),
    plan_sentences=("Recommend {plan}.", "Tx: {plan}.", "Next steps: {plan}."),
    follow_ups=(", return in {w} weeks", ", recheck in {n} days"),
    one_liners=(
        "{demo} seen for {cc} {dur} - {dx}, tx {plan}.",
        "Visit for {cc} {dur}: {dx}; recommend {plan}.",
    ),
)

POOL_C = Pool(
    name="C",
    cases=(
        Case("seborrheic dermatitis", "L21.9", ("flaky itchy scalp", "greasy scales on eyebrows"),
             ("ketoconazole 2% shampoo twice weekly", "selenium sulfide shampoo, hydrocortisone 1% lotion PRN")),
        Case("impetigo", "L01.00", ("honey-crusted sores near mouth", "crusted rash on chin"),
             ("mupirocin 2% ointment t.i.d. x5d", "cephalexin 250 mg PO q.i.d. x7d, hand hygiene")),
        Case("costochondritis", "M94.0", ("sharp chest wall pain", "pain at sternal border"),
             ("naproxen 250 mg PO b.i.d. x10d, reassurance", "warm compresses, avoid strenuous lifting")),
        Case("pityriasis rosea", "L42", ("scaly oval patches on trunk", "herald patch then spreading rash"),
             ("reassurance, calamine lotion PRN", "cetirizine 10 mg PO qhs for itch")),
        Case("functional dyspepsia", "K30", ("early satiety and bloating", "upper abdominal fullness"),
             ("trial of lansoprazole 30 mg PO q.a.m.", "small frequent meals, simethicone PRN")),
        Case("irritable bowel syndrome with diarrhea", "K58.0", ("loose stools with cramping", "urgent loose BMs after meals"),
             ("low-FODMAP diet, loperamide 2 mg PRN", "dicyclomine 20 mg PO q.i.d. PRN, stool studies")),
        Case("restless legs syndrome", "G25.81", ("urge to move legs at night", "creeping sensation in calves"),
             ("ferritin level, pramipexole 0.125 mg PO qhs", "iron panel, stretching before bed")),
        Case("Bell's palsy", "G51.0", ("sudden R facial droop", "cannot close L eye"),
             ("prednisolone 60 mg PO q.d. x5d, eye patch at night", "valacyclovir plus steroid taper, lubricating drops")),
        Case("trigger finger, right middle finger", "M65.331", ("R middle finger locking", "painful catching of finger"),
             ("finger splint, steroid injection", "hand therapy, splint at night")),
        Case("de Quervain tenosynovitis", "M65.4", ("radial wrist pain with thumb use", "pain at base of thumb"),
             ("thumb spica splint, NSAID PRN", "corticosteroid injection, thumb rest")),
        Case("hypertriglyceridemia", "E78.1", ("triglycerides of 480", "milky serum on labs"),
             ("fenofibrate 145 mg PO q.d., limit sugar", "icosapent ethyl 2 g PO b.i.d., repeat panel"), chronic=True),
        Case("vitamin B12 deficiency anemia", "D51.9", ("numb feet and tiredness", "sore tongue and pallor"),
             ("cyanocobalamin 1000 mcg IM monthly", "oral B12 1000 mcg q.d., recheck CBC")),
        Case("acute laryngitis", "J04.0", ("hoarse voice", "loss of voice"),
             ("voice rest, humidifier", "warm fluids, avoid whispering")),
        Case("angina pectoris", "I20.9", ("exertional chest tightness", "chest pressure climbing stairs"),
             ("nitroglycerin 0.4 mg SL PRN, stress test", "aspirin 81 mg PO q.d., cardiology referral"), chronic=True),
        Case("age-related osteoporosis", "M81.0", ("loss of height", "low bone density on DEXA"),
             ("alendronate 70 mg PO weekly, calcium with vitamin D", "weight-bearing exercise, zoledronic acid IV yearly"),
             chronic=True),
        Case("hyperthyroidism", "E05.90", ("heat intolerance and tremor", "unintended weight loss and palpitations"),
             ("methimazole 10 mg PO q.d., TSH in 4 wks", "propranolol 10 mg PO t.i.d., thyroid uptake scan"), chronic=True),
        Case("erectile dysfunction", "N52.9", ("difficulty maintaining erections", "ED for months"),
             ("sildenafil 50 mg PO PRN", "tadalafil 5 mg PO q.d., testosterone level"), chronic=True, sex="M"),
        Case("primary dysmenorrhea", "N94.6", ("painful periods", "cramping with menses"),
             ("naproxen 500 mg PO b.i.d. with menses", "combined oral contraceptive, heating pad")),
        Case("ingrown toenail", "L60.0", ("painful R big toe nail edge", "red swollen toe margin"),
             ("warm soaks, partial nail avulsion", "podiatry referral, proper nail trimming")),
    ),
    demographics=("{age}/{s}", "{sex}, {age}", "{age} y.o. {sex}", "{person}, {age}"),
    durations=("lasting {n} days", "of {w} weeks' duration", "starting {n} days ago", "ongoing {w} wks"),
    openers=(
        "{demo} here for {cc} {dur}.",
        "Chief complaint: {cc}, {dur}.",
        "{demo} states {cc} {dur}.",
        "{demo} describes {cc} {dur}.",
        "Visit reason - {cc} {dur}.",
    ),
    extras=(
        "Afebrile, vitals stable.",
        "BP {sbp}/{dbp}, pulse {hr}.",
        "Background: {pmh}.",
        "No known drug allergies.",
        "Rest of exam benign.",
    ),
    dx_sentences=("Clinical dx: {dx}.", "Probable {dx}.", "Assessed as {dx}.", "Findings suggest {dx}."),
    code_styles=("{name} - ICD-10-CM {code}", "{name} (dx code {code})"),
    dx_joiners=(" / ", " + "),
    plan_sentences=("Management: {plan}.", "Rx: {plan}.", "To do: {plan}."),
    follow_ups=(", follow up in {w} weeks", ", revisit in {n} days"),
    one_liners=(
        "{demo} with {cc} {dur} => {dx}; management {plan}.",
        "Note - {cc} ({dur}), {demo}: {dx}. Rx {plan}.",
    ),
)
