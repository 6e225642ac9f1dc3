-- Auto-forward for Orthanc acting as the PACS: send every stable study to dicom-node, once,
-- without dicom-node's own results.
--
-- Orthanc calls OnStableStudy when a study has received no new instance for "StableAge"
-- seconds (orthanc.json). dicom-node answers with a DICOM SR stored in the SAME study, so the
-- study becomes stable a second time when the result arrives. An unguarded script would then
-- send the whole study, result included, back to dicom-node. That would not start a loop:
-- dicom-node recognises its own result and ignores it for completion, and images it already has
-- (re-sent SOP Instance UIDs) do not reopen a processed study. But it would send the whole study
-- over the network again after every result, for nothing. The guard:
--
--   * an instance whose RemoteAET is dicom-node's AE title is a result: it is never forwarded;
--   * an instance that was forwarded successfully is marked with the metadata "ForwardedToNode"
--     (declared in orthanc.json under "UserMetadata") and is never forwarded again.
--
-- A late image (an instance of an already forwarded study that is not marked yet, so a new SOP
-- Instance UID for dicom-node) is forwarded on its own the next time the study is stable;
-- dicom-node then reopens the study and sends a new result in a new series (see
-- docs/receiving.md, "Late instances"). To have dicom-node process a study again without new
-- images, run `dicom-node reprocess <StudyInstanceUID>` on the node.
--
-- A failed forward leaves its instances unmarked and is printed in Orthanc's log; the next
-- stable event of the study, or a manual POST /modalities/node/store, sends them again.

-- The key of dicom-node in orthanc.json "DicomModalities".
local NODE_MODALITY = 'node'
-- dicom-node's calling AE title when it sends results: [node] ae_title in its config.toml, or
-- the destination's calling_ae_title when that is set.
local NODE_AET = 'DICOM_NODE'
-- User metadata marking an instance as forwarded (must be declared in "UserMetadata").
local MARK = 'ForwardedToNode'

function OnStableStudy(studyId, tags, metadata)
  local instances = ParseJson(RestApiGet('/studies/' .. studyId .. '/instances'))
  if instances == nil then
    return  -- the study was deleted in the meantime
  end

  local pending = {}
  local results = 0
  for _, instance in ipairs(instances) do
    local meta = ParseJson(RestApiGet('/instances/' .. instance['ID'] .. '/metadata?expand'))
    if meta['RemoteAET'] == NODE_AET then
      results = results + 1
    elseif meta[MARK] == nil then
      table.insert(pending, instance['ID'])
    end
  end

  if #pending == 0 then
    print('dicom-node forward: study ' .. studyId .. ': nothing to send (' .. results ..
          ' result instance(s) from ' .. NODE_AET .. ', the rest already sent)')
    return
  end

  -- Synchronous: the instances are marked only once dicom-node has acknowledged them all.
  local answer = RestApiPost('/modalities/' .. NODE_MODALITY .. '/store',
                             DumpJson({ Resources = pending, Synchronous = true }, true))
  if answer == nil then
    print('dicom-node forward: study ' .. studyId .. ': sending ' .. #pending ..
          ' instance(s) to modality "' .. NODE_MODALITY .. '" FAILED; they stay unmarked')
    return
  end

  for _, id in ipairs(pending) do
    RestApiPut('/instances/' .. id .. '/metadata/' .. MARK, 'yes')
  end
  print('dicom-node forward: study ' .. studyId .. ': ' .. #pending .. ' instance(s) sent to "' ..
        NODE_MODALITY .. '"')
end
